// The one binding module: declares the vlmr1:: torch ops. Kernels register themselves per device
// (cpu_kernels.cpp for CPU, cuda_kernels.cu for CUDA when the extension is built with CUDA).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vlmr1, m) {
  // Per-row softmax statistics of this rank's vocabulary shard: [N, 4] fp32 = (max, sum, dot, target_logit),
  // see softmax_stats.h; target_logit is 0 when the target lives on another shard or is ignore_index. Only the
  // columns of global ids [vocab_start, vocab_end) are read (the rest is padded vocabulary, taken as -inf); rows
  // whose target is ignore_index are not read at all and get (0, 1, 0, 0).
  m.def(
      "logprob_stats(Tensor logits, Tensor targets, int vocab_start, int vocab_end, float inv_temp, "
      "int ignore_index) -> Tensor");
  // Writes d(loss)/d(logits) for loss = sum(grad_logprob * logprob + grad_entropy * entropy) into grad_logits,
  // which may be `logits` itself (in-place backward). row_max and log_sum: the global max and log(sum-exp) of
  // each row (lse = row_max + log_sum, kept apart so that logp = (x - row_max) - log_sum stays exact for |x| ~ 1e4).
  // Ignored rows and columns at or beyond vocab_end get 0 without being read.
  m.def(
      "logprob_grad(Tensor logits, Tensor targets, Tensor row_max, Tensor log_sum, Tensor entropy, Tensor grad_logprob, "
      "Tensor? grad_entropy, int vocab_start, int vocab_end, float inv_temp, int ignore_index, "
      "Tensor(a!) grad_logits) -> ()");
  // GRPO group advantage over contiguous groups of `group_size` rewards.
  m.def("group_advantage(Tensor rewards, int group_size, bool scale_std, float eps) -> Tensor");
}

// Importing the module (megatron_vlmr1._C) is what loads the ops into torch.ops.vlmr1.
static struct PyModuleDef vlmr1_module = {PyModuleDef_HEAD_INIT, "_C", "megatron_vlmr1 csrc kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vlmr1_module); }
