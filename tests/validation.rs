//! Inputs that once gave wrong numbers or a panic deep inside: windows of `usize::MAX`,
//! a stride of 0, a block layout built for other lengths, a scale past f32.

use burn::tensor::{Device, Distribution, Tensor};
use burn_attn::cores::{pattern_attention, BlockLayout, KeyPattern};
use burn_attn::{attention, AttentionOptions, Window};

/// The CPU device (ndarray, which Burn 0.22 deprecates; our default CPU backend).
#[allow(deprecated)]
fn cpu() -> Device {
    Device::ndarray()
}

fn qkv(n: usize) -> [Tensor<4>; 3] {
    let device = cpu();
    device.seed(11);
    [0; 3].map(|_| Tensor::random([2, 2, n, 8], Distribution::Normal(0.0, 1.0), &device))
}

fn max_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

#[test]
fn a_side_of_usize_max_is_unbounded() {
    let [q, k, v] = qkv(23);
    let run = |window: Window, causal: bool| {
        let options = AttentionOptions::new()
            .with_window(window)
            .with_causal(causal);
        attention(q.clone(), k.clone(), v.clone(), &options)
    };
    let full = run(Window::FULL, false);
    let huge = run(Window::new(Some(usize::MAX), None), false);
    assert!(max_diff(full.clone(), huge) < 1e-6);
    let both = run(Window::new(Some(usize::MAX), Some(usize::MAX)), false);
    assert!(max_diff(full, both) < 1e-6);
    let causal = run(Window::FULL, true);
    let huge_causal = run(Window::causal(usize::MAX), false);
    assert!(max_diff(causal, huge_causal) < 1e-6);
}

#[test]
#[should_panic(expected = "stride")]
fn a_stride_of_zero_is_an_error() {
    let [q, k, v] = qkv(9);
    let pattern = KeyPattern {
        stride: Some(0),
        ..KeyPattern::default()
    };
    let _ = pattern_attention(q, k, v, &pattern, &AttentionOptions::new(), None, 0.0);
}

#[test]
#[should_panic(expected = "block layout of 3 x 3 blocks")]
fn a_block_layout_for_other_lengths_is_an_error() {
    let [q, k, v] = qkv(40);
    let pattern = KeyPattern {
        blocks: Some(BlockLayout::random(9, 9, 4, 0.5, 1).unwrap()),
        ..KeyPattern::default()
    };
    let _ = pattern_attention(q, k, v, &pattern, &AttentionOptions::new(), None, 0.0);
}

#[test]
fn a_scale_past_f32_is_rejected() {
    let err = AttentionOptions::new()
        .with_scale(1e39)
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("1e39"), "{err}");
    assert!(AttentionOptions::new()
        .with_scale(1e-50)
        .validate()
        .is_err());
    assert!(AttentionOptions::new().with_scale(0.125).validate().is_ok());
}

#[test]
#[should_panic(expected = "dropout 1 (takes 0 <= dropout < 1)")]
fn dropout_of_one_is_an_error() {
    let [q, k, v] = qkv(9);
    let band = KeyPattern::band(Window::FULL, false);
    let _ = pattern_attention(q, k, v, &band, &AttentionOptions::new(), None, 1.0);
}

#[test]
#[should_panic(expected = "q, k and v must share one dtype: q F32, k F64")]
fn mixed_dtypes_are_an_error() {
    let [q, k, v] = qkv(9);
    let k = k.cast(burn::tensor::DType::F64);
    let _ = attention(q, k, v, &AttentionOptions::new());
}

#[test]
#[should_panic(expected = "eps must be finite and positive")]
fn linear_attention_with_eps_zero_is_an_error() {
    let [q, k, v] = qkv(9);
    let _ = burn_attn::cores::linear_attention(q.exp(), k.exp(), v, 0.0, None);
}

/// An eps that is positive in f64 but 0 in f32, where the normaliser is computed.
#[test]
#[should_panic(expected = "eps must be finite and positive in f32")]
fn linear_attention_with_eps_below_f32_is_an_error() {
    let [q, k, v] = qkv(9);
    let _ = burn_attn::cores::linear_attention(q.exp(), k.exp(), v, 1e-50, None);
}

#[test]
#[should_panic(expected = "causal linear attention needs as many queries as keys, got 9 and 12")]
fn causal_linear_attention_of_different_lengths_is_an_error() {
    let [q, _, _] = qkv(9);
    let [_, k, v] = qkv(12);
    let _ = burn_attn::cores::causal_linear_attention(q.exp(), k.exp(), v, 4, 1e-6, None);
}

#[test]
#[should_panic(
    expected = "the linear attention state has kv [2, 2, 8, 7] and z [2, 2, 8], expected kv [2, 2, 8, 8] and z [2, 2, 8]"
)]
fn linear_state_of_the_wrong_shape_is_an_error() {
    let [q, k, v] = qkv(9);
    let device = cpu();
    let state = burn_attn::LinearAttentionState {
        kv: Tensor::zeros([2, 2, 8, 7], &device),
        z: Tensor::zeros([2, 2, 8], &device),
    };
    let _ = burn_attn::cores::causal_linear_attention(q.exp(), k.exp(), v, 4, 1e-6, Some(state));
}

#[test]
#[should_panic(expected = "kernel_chunk must be 16, 32 or 64, got 24")]
fn linear_kernel_chunk_outside_the_kernels_is_an_error() {
    let [q, k, v] = qkv(9);
    let options = burn_attn::cores::LinearOptions::new().with_kernel_chunk(24);
    let _ = burn_attn::cores::linear_attention_with(q.exp(), k.exp(), v, None, &options);
}

#[test]
fn linear_modules_reject_eps_zero() {
    let err = burn_attn::LinearAttentionConfig::new(16, 2)
        .with_eps(0.0)
        .validate()
        .unwrap_err();
    assert!(err.to_string().contains("got 0"), "{err}");
    assert!(burn_attn::CausalLinearAttentionConfig::new(16, 2)
        .with_eps(-1.0)
        .validate()
        .is_err());
}

/// The `try_` forms return what the panicking forms panic with, and the result otherwise.
#[test]
fn try_forms_return_bad_input_as_errors() {
    use burn_attn::{try_attention, try_pattern_attention, AttentionError};
    let [q, k, v] = qkv(16);
    let device = cpu();
    let narrow_k = Tensor::<4>::zeros([2, 2, 16, 4], &device);
    let err = try_attention(q.clone(), narrow_k, v.clone(), &AttentionOptions::new())
        .expect_err("a head dim mismatch");
    assert!(matches!(err, AttentionError::Shape { .. }), "{err}");
    assert!(err.to_string().contains("[2, 2, 16, 4]"), "{err}");

    let odd_kv = Tensor::<4>::zeros([2, 3, 16, 8], &device);
    let err = try_attention(q.clone(), odd_kv.clone(), odd_kv, &AttentionOptions::new())
        .expect_err("2 query heads over 3 kv heads");
    assert!(err.to_string().contains('3'), "{err}");

    let err = try_pattern_attention(
        q.clone(),
        k.clone(),
        v.clone(),
        &KeyPattern::default(),
        &AttentionOptions::new(),
        None,
        1.0,
    )
    .expect_err("dropout 1");
    assert!(err.to_string().contains("dropout 1"), "{err}");

    let options = AttentionOptions::new().with_causal(true);
    let ok = try_attention(q.clone(), k.clone(), v.clone(), &options).expect("valid input");
    assert_eq!(max_diff(ok, attention(q, k, v, &options)), 0.0);
}

/// Two calls with the same inputs give the same bits (forward and lse).
#[test]
fn the_forward_is_deterministic() {
    use burn_attn::cores::attention_with_lse;
    let [q, k, v] = qkv(77);
    let options = AttentionOptions::new().with_window(Window::new(Some(20), Some(5)));
    let run = || attention_with_lse(q.clone(), k.clone(), v.clone(), &options);
    let ((o1, l1), (o2, l2)) = (run(), run());
    assert_eq!(o1.into_data().as_bytes(), o2.into_data().as_bytes());
    assert_eq!(l1.into_data().as_bytes(), l2.into_data().as_bytes());
}

#[test]
fn document_ids_that_decrease_or_misfit_are_errors() {
    use burn::tensor::{Int, TensorData};
    use burn_attn::{try_masked_attention, AttentionMasks, DocumentIds};
    let [q, k, v] = qkv(6);
    let ids = |values: Vec<i64>, len: usize| {
        Tensor::<2, Int>::from_data(TensorData::new(values, [2, len]), &cpu())
    };
    let run = |docs: DocumentIds| {
        let masks = AttentionMasks {
            documents: Some(docs),
            ..AttentionMasks::default()
        };
        let options = AttentionOptions::new();
        try_masked_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &KeyPattern::default(),
            &options,
            &masks,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let decreasing = ids(vec![0, 0, 1, 1, 2, 2, 0, 1, 1, 0, 2, 2], 6);
    let err = run(DocumentIds::self_attention(decreasing.clone()));
    assert!(
        err.contains("batch 1, positions 2 and 3 hold 1 then 0"),
        "{err}"
    );
    // Checked once, up front: the same error, before any call.
    let err = DocumentIds::self_attention(decreasing)
        .checked()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("batch 1, positions 2 and 3 hold 1 then 0"),
        "{err}"
    );
    let short = ids(vec![0; 10], 5);
    let err = run(DocumentIds::new(ids(vec![0; 12], 6), short));
    assert!(
        err.contains("key document ids") && err.contains("[2, 5]"),
        "{err}"
    );
}

#[test]
fn an_attention_mask_of_other_lengths_is_an_error() {
    use burn::tensor::Bool;
    use burn_attn::{try_masked_attention, AttentionMasks};
    let [q, k, v] = qkv(6);
    let masks = AttentionMasks {
        attention_mask: Some(Tensor::<3, Bool>::empty([2, 6, 5], &cpu())),
        ..AttentionMasks::default()
    };
    let err = try_masked_attention(
        q,
        k,
        v,
        &KeyPattern::default(),
        &AttentionOptions::new(),
        &masks,
    )
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("attention mask") && err.contains("[2, 6, 5]"),
        "{err}"
    );
}

/// Score terms that do not fit the call, and out-of-range modifiers, are errors naming the
/// values (batch 2, 2 heads, 6 positions).
#[test]
fn bad_score_terms_are_errors() {
    use burn_attn::{try_masked_attention, AttentionMasks, SoftEdge};
    let [q, k, v] = qkv(6);
    let run = |masks: AttentionMasks| {
        try_masked_attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &KeyPattern::default(),
            &AttentionOptions::new(),
            &masks,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let zeros = |dims: [usize; 3]| Tensor::<3>::zeros(dims, &cpu());
    let err = run(AttentionMasks {
        key_bias: Some(zeros([2, 3, 6])),
        ..AttentionMasks::default()
    });
    assert!(
        err.contains("key bias") && err.contains("[2, 3, 6]"),
        "{err}"
    );
    let edge = |reach: Tensor<3>, ramp: f64| AttentionMasks {
        soft_edge: Some(SoftEdge { reach, ramp }),
        ..AttentionMasks::default()
    };
    let err = run(edge(zeros([2, 1, 5]), 1.0));
    assert!(err.contains("reach") && err.contains("[2, 1, 5]"), "{err}");
    // Widths and caps are checked where they are applied, in f32.
    for ramp in [0.0, 1e-50] {
        let err = run(edge(zeros([2, 1, 6]), ramp));
        assert!(err.contains(&format!("ramp {ramp}")), "{err}");
    }
    let err = run(AttentionMasks {
        alibi: Some(vec![0.5]),
        ..AttentionMasks::default()
    });
    assert!(
        err.contains("ALiBi") && err.contains("[0.5]") && err.contains('2'),
        "{err}"
    );
    for cap in [0.0, f64::NAN, 1e39, 1e-50] {
        let err = run(AttentionMasks {
            softcap: Some(cap),
            ..AttentionMasks::default()
        });
        assert!(err.contains(&format!("softcap {cap}")), "{err}");
    }
    let err = run(AttentionMasks {
        score_bias: Some(Tensor::<4>::zeros([1, 2, 6, 5], &cpu())),
        ..AttentionMasks::default()
    });
    assert!(
        err.contains("score bias") && err.contains("[1, 2, 6, 5]"),
        "{err}"
    );
}
