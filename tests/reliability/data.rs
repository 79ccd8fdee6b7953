//! SFT data files (JSONL): the error names the file, the line and the field.

use super::*;

bad_input!(malformed_jsonl_line, |d| case(
    "malformed JSONL line",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "malformed.jsonl",
            b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \n",
        ))],
    ),
    &["malformed.jsonl:2", "invalid JSON"],
));

bad_input!(empty_jsonl_file, |d| case(
    "empty JSONL file",
    sft(&out(d), &[train_file(&write(d, "empty.jsonl", b""))]),
    &["empty.jsonl", "no examples"],
));

bad_input!(only_blank_lines, |d| case(
    "only blank lines",
    sft(&out(d), &[train_file(&write(d, "blank.jsonl", b"\n \n\n"))]),
    &["blank.jsonl", "no examples"],
));

bad_input!(missing_completion, |d| case(
    "missing completion",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "nocomp.jsonl",
            b"{\"prompt\": \"a\"}\n"
        ))],
    ),
    &["nocomp.jsonl:1", "completion"],
));

bad_input!(missing_prompt, |d| case(
    "missing prompt",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "noprompt.jsonl",
            b"{\"completion\": \"a\"}\n"
        ))],
    ),
    &["noprompt.jsonl:1", "prompt"],
));

bad_input!(completion_of_the_wrong_type, |d| case(
    "completion of the wrong type",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "wrongtype.jsonl",
            b"{\"prompt\": \"a\", \"completion\": 5}\n",
        ))],
    ),
    &["wrongtype.jsonl:1", "strings"],
));

bad_input!(non_utf8_bytes, |d| case(
    "non-UTF-8 bytes",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "latin1.jsonl",
            b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n",
        ))],
    ),
    &["latin1.jsonl:2", "UTF-8"],
));

bad_input!(a_line_that_is_not_an_object, |d| case(
    "a line that is not an object",
    sft(
        &out(d),
        &[train_file(&write(d, "array.jsonl", b"[1, 2, 3]\n"))]
    ),
    &["array.jsonl:1"],
));

bad_input!(no_known_row_shape, |d| case(
    "no known row shape",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "shape.jsonl",
            b"{\"question\": \"a\"}\n"
        ))],
    ),
    &["shape.jsonl:1", "`messages`"],
));

bad_input!(message_content_of_the_wrong_type, |d| case(
    "message content of the wrong type",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "msgtype.jsonl",
            b"{\"messages\": [{\"role\": \"user\", \"content\": 3}]}\n",
        ))],
    ),
    &["msgtype.jsonl:1", "messages[0].content"],
));

bad_input!(messages_not_a_list, |d| case(
    "messages not a list",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "msglist.jsonl",
            b"{\"messages\": \"hi\"}\n"
        ))],
    ),
    &["msglist.jsonl:1", "messages"],
));

bad_input!(a_message_without_a_role, |d| case(
    "a message without a role",
    sft(
        &out(d),
        &[train_file(&write(
            d,
            "msgrole.jsonl",
            b"{\"messages\": [{\"content\": \"hi\"}]}\n",
        ))],
    ),
    &["msgrole.jsonl:1", "role"],
));

bad_input!(bad_line_in_the_eval_file, |d| case(
    "bad line in the eval file",
    sft(
        &out(d),
        &[format!(
            "data.eval_file={}",
            q(&write(
                d,
                "evalbad.jsonl",
                b"{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n",
            ))
        )],
    ),
    &["evalbad.jsonl:2"],
));

bad_input!(missing_train_file, |d| case(
    "missing train file",
    sft(&out(d), &[s("data.train_file=\"nowhere/train.jsonl\"")]),
    &["nowhere/train.jsonl"],
));
