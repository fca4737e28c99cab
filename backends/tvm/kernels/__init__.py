"""Our TIR kernels, one module per kernel (``softmax``: the two-pass softmax of Dukhan &
Ablavatski 2020 and its baselines; ``cross_entropy``, ``linear_cross_entropy``,
``sigmoid_attention``, ``int8_matmul``, ``bf16_matmul`` ...), and in ``common`` the SIMD
pieces they share. The package imports none of them: a lowering imports the kernel it
calls."""
