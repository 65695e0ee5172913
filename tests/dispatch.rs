//! Which implementation serves a call, on the CPU backend (no kernels): the dispatch log,
//! the kernel policy, and options that force nothing.

use burn::tensor::{Device, Distribution, Tensor};
use burn_attn::cores::{Dispatch, DispatchLog, Implementation, KernelPolicy, Pass};
use burn_attn::{attention, AttentionOptions};

/// The CPU device (ndarray, which Burn 0.22 deprecates; our default CPU backend).
#[allow(deprecated)]
fn cpu() -> Device {
    Device::ndarray()
}

fn qkv(device: &Device) -> [Tensor<4>; 3] {
    device.seed(7);
    [0; 3].map(|_| Tensor::random([2, 2, 9, 8], Distribution::Normal(0.0, 1.0), device))
}

#[test]
fn cpu_calls_are_served_by_the_tiled_ops_and_logged_per_pass() {
    let log = DispatchLog::new();
    let options = AttentionOptions::new()
        .with_causal(true)
        .with_log(log.clone());
    let [q, k, v] = qkv(&cpu().autodiff()).map(|t| t.require_grad());
    let out = attention(q.clone(), k, v, &options);
    let grads = out.sum().backward();
    assert!(q.grad(&grads).is_some());
    let tiled = |pass| Dispatch {
        pass,
        served: Implementation::Tiled,
        declined: Vec::new(),
    };
    assert_eq!(
        log.entries(),
        vec![tiled(Pass::Forward), tiled(Pass::Backward)]
    );
    // A log belongs to the options that hold it: another call's log stays empty.
    let other = DispatchLog::new();
    let [q, k, v] = qkv(&cpu());
    let _ = attention(q, k, v, &AttentionOptions::new());
    assert!(other.entries().is_empty());
    assert_eq!(log.entries().len(), 2);
}

#[test]
#[should_panic(expected = "a kernel is required")]
fn requiring_a_kernel_where_none_exists_panics() {
    let [q, k, v] = qkv(&cpu());
    let options = AttentionOptions::new().with_kernel(KernelPolicy::Require);
    let _ = attention(q, k, v, &options);
}

#[test]
fn options_with_tf32_give_the_same_cpu_result() {
    let [q, k, v] = qkv(&cpu());
    let plain = attention(q.clone(), k.clone(), v.clone(), &AttentionOptions::new());
    let tf32 = attention(q, k, v, &AttentionOptions::new().with_tf32(true));
    plain.into_data().assert_eq(&tf32.into_data(), true);
}
