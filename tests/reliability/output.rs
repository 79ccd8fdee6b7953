//! The output folder and `--resume`: the error names the path.

use super::*;

bad_input!(output_dir_under_a_file, |d| case(
    "output_dir under a file",
    sft(&write(d, "a_file", b"x").join("run"), &[]),
    &["a_file/run"],
));

bad_input!(resume_without_a_checkpoint, |d| case(
    "resume without a checkpoint",
    {
        let mut a = sft(&d.join("fresh"), &[]);
        a.push(s("--resume"));
        a
    },
    &["--resume", "no checkpoint-N folder"],
));

bad_input!(resume_from_a_folder_that_is_not_a_checkpoint, |d| case(
    "resume from a folder that is not a checkpoint",
    {
        let mut a = sft(&out(d), &[]);
        a.push(s("--resume=configs"));
        a
    },
    &["--resume configs", "trainer_state.json"],
));
