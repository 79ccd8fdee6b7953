//! The GGUF conversion's parts on hand-made inputs; the whole path on the real model is
//! `tests/real_model.rs`, and on a written file `tests/gguf.rs`.

use super::tensors::{gguf_name, hf_name, permute_rows, unpermute_rows};
use super::tokenizer::{bytes_to_unicode, generate_merges};

/// llama.cpp's permutation of 2 heads × (2 halves × 2 rows): HF row order (h, half, i) is
/// stored as (h, i, half); undoing it restores HF order, and the two are inverses.
#[test]
fn q_k_rows_permute_as_llama_cpp_does() {
    // 8 rows of 1 column: the value is the HF row index.
    let hf: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let stored = permute_rows(&hf, 8, 1, 2);
    // convert_hf_to_gguf: reshape(heads, 2, d, cols).swapaxes(1, 2): per head [0, 2, 1, 3].
    assert_eq!(stored, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    assert_eq!(unpermute_rows(&stored, 8, 1, 2), hf);
    let wide: Vec<f32> = (0..12 * 3).map(|i| i as f32).collect();
    assert_eq!(
        unpermute_rows(&permute_rows(&wide, 12, 3, 3), 12, 3, 3),
        wide
    );
}

#[test]
fn tensor_names_map_to_transformers() {
    let cases = [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("output_norm.weight", "model.norm.weight"),
        (
            "blk.0.attn_q.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            "blk.11.attn_k.bias",
            "model.layers.11.self_attn.k_proj.bias",
        ),
        (
            "blk.3.attn_output.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ),
        (
            "blk.3.ffn_gate.weight",
            "model.layers.3.mlp.gate_proj.weight",
        ),
        (
            "blk.3.ffn_down.weight",
            "model.layers.3.mlp.down_proj.weight",
        ),
        (
            "blk.29.ffn_norm.weight",
            "model.layers.29.post_attention_layernorm.weight",
        ),
        (
            "blk.29.attn_norm.weight",
            "model.layers.29.input_layernorm.weight",
        ),
    ];
    for (gguf, hf) in cases {
        assert_eq!(hf_name(gguf).as_deref(), Some(hf), "{gguf}");
        assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
    }
    for unknown in [
        "rope_freqs.weight",
        "blk.x.attn_q.weight",
        "blk.0.ssm_a",
        "blk.0.attn_q.scale",
    ] {
        assert_eq!(hf_name(unknown), None, "{unknown}");
    }
}

/// GPT-2's table: printable bytes stand for themselves, the rest are shifted past 255
/// (space → Ġ U+0120, newline → Ċ U+010A), and the 256 characters are distinct.
#[test]
fn byte_alphabet_is_gpt2s() {
    let t = bytes_to_unicode();
    assert_eq!(t[b'a' as usize], 'a');
    assert_eq!(t[b' ' as usize], 'Ġ');
    assert_eq!(t[b'\n' as usize], 'Ċ');
    assert_eq!(t[0], 'Ā');
    let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
    assert_eq!(distinct.len(), 256);
}

/// transformers' `generate_merges` on a hand-checked vocabulary: every split into two known
/// tokens, best score first, ties by the parts' lengths (longer first), then file order.
#[test]
fn merges_recovered_from_scores() {
    let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
    let got = generate_merges(&tokens, &scores);
    let want: Vec<(String, String)> = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(got, want);
}
