"""The Relax pipeline of :func:`rewriter.backends.tvm.compile`, for a target.

The pipeline, in order (each stage a list in :func:`relax_pipeline`):

1. import (:mod:`rewriter.backends.tvm.import_onnx` for ONNX,
   :mod:`rewriter.backends.tvm.import_torch` for a ``torch.export.ExportedProgram``): our
   ops become ``call_tir`` to our kernels, weights become constants of the module; on
   targets with AVX512-BF16, bf16 matmuls with a constant weight become ``call_tir`` to
   our ``vdpbf16ps`` kernel, or our AMX kernel where the target has AMX-BF16
   (:mod:`rewriter.backends.tvm.relax_passes.bf16_matmul`);
2. ONNX's variadic ``Min``/``Max``/``Sum`` as pairwise ops rather than TVM's stack and
   reduction (:mod:`rewriter.backends.tvm.relax_passes.pairwise`); a ``split`` as one
   slice per part (:mod:`rewriter.backends.tvm.relax_passes.split_slices`); a pool whose one
   window covers its map as a global pool
   (:mod:`rewriter.backends.tvm.relax_passes.global_pools`); inference forms: batch norms folded into the convolutions before them (the rest
   decomposed into a scale and a shift, its result tuple dropped so that it fuses with
   what reads it), constant computations folded; on CPUs transposed convolutions of
   non-overlapping blocks as 1 x 1 ones and a depth-to-space
   (:mod:`rewriter.backends.tvm.relax_passes.conv_transpose`), the
   convolutions channels-last (:mod:`rewriter.backends.tvm.relax_passes.conv`), 3-D ones
   then as 2-D ones over their depth taps stacked into the channels
   (:mod:`rewriter.backends.tvm.relax_passes.conv_depth`), 1-D ones
   over whole tiles of frames (:mod:`rewriter.backends.tvm.relax_passes.conv_frames`),
   3 x 3 ones over enough output tiles by Winograd's F(2 x 2, 3 x 3)
   (:mod:`rewriter.backends.tvm.relax_passes.winograd`), and matmuls by a 2-D weight
   over two or more symbolic leading axes on those axes flattened
   (:mod:`rewriter.backends.tvm.relax_passes.flat_rows`; dlight's CUDA matmul rule
   fuses the leading axes itself);
3. ``FastMathTransform`` (optional, on by default): ``exp``/``erf``/``tanh`` (and a
   stock ``softmax``) become TVM's polynomial versions, after sigmoid, silu and gelu are
   spelled out in them (:mod:`rewriter.backends.tvm.relax_passes.activations`; BERT
   outputs move by ~1e-6 relative; our two-pass kernel is not touched); divisions by
   constants, and quantizes, multiply by the reciprocal
   (:mod:`rewriter.backends.tvm.relax_passes.reciprocal`, within one ulp);
4. TVM's legalization and fusion (``LegalizeOps`` ... ``FuseTIR``), float ``max``/``min``
   reduced from ``-inf``/``+inf`` rather than TVM's finite extremes
   (:mod:`rewriter.backends.tvm.relax_passes.reduce_identity`), pads, reversals and
   slices at symbolic sizes fused as injective, as at fixed sizes
   (:mod:`rewriter.backends.tvm.relax_passes.op_patterns`);
5. scheduling: on CPUs constant matmul and convolution weights packed in panels
   (:mod:`rewriter.backends.tvm.relax_passes.pack_weights`), then our rules
   (:mod:`rewriter.backends.tvm.relax_passes.cpu_schedule`: register-tiled matmul and
   convolutions, channels-last windows, vectorized row reductions, tiled transposes and
   elementwise loops); on CUDA
   ``tvm.s_tir.dlight`` (Matmul, GEMV, Reduction, GeneralReduction, Fallback), applied by
   ``cpu_schedule.gpu_schedule``: a rule that raises on a function is passed over. With
   ``tune``/``tune_db`` (CPU targets), before our rules: the tuning stage
   (:mod:`rewriter.backends.tvm.tuning`) tunes what the database lacks and gives each
   function its best record where that beat ours side by side; our rules schedule the rest;
6. TVM's lowering to the Relax VM; on CPUs, before memory planning, every output of
   ``main`` in a buffer of its own and ``main_out``, which writes the outputs into the
   caller's arrays (:mod:`rewriter.backends.tvm.relax_passes.outputs_as_params`);
   memory planning sizes the buffers of symbolic dimensions at their upper bounds where
   ``main`` has them (``tir_var_upper_bound``, from ``compile(max_dims=...)``); storages
   of symbolic size are shared between tensors whose lifetimes do not overlap, where
   their sizes are a constant times the same variables; ``storage`` counts the
   allocations left constant or sized at run time
   (:mod:`rewriter.backends.tvm.relax_passes.memory_plan`); the VM's shape functions
   store their sizes in slot order, so a model compiled twice is the same library
   (:mod:`rewriter.backends.tvm.relax_passes.shape_funcs`).

>>> executable = relax.build(mod, target=target, relax_pipeline=relax_pipeline(target))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rewriter.backends.tvm import tuning
from rewriter.backends.tvm.relax_passes import cpu_schedule, memory_plan, shape_funcs

if TYPE_CHECKING:
    import tvm


def relax_pipeline(
    target: tvm.target.Target,
    *,
    fast_math: bool = True,
    tuner: tuning.Tuner | None = None,
    record: cpu_schedule.ScheduleRecord | None = None,
    storage: memory_plan.StorageRecord | None = None,
) -> tvm.transform.Pass:
    """The Relax pipeline of :func:`rewriter.backends.tvm.compile` for ``target`` (see the
    module docstring); ``record`` (CPU targets) collects which rule scheduled each function,
    ``storage`` how many storage allocations memory planning gave a constant size."""
    import tvm
    from tvm import relax

    from rewriter.backends.tvm.relax_passes import (
        activations,
        bf16_matmul,
        bind_shapes,
        carried_channels,
        concat_in_place,
        conv,
        conv_frames,
        conv_transpose,
        flat_rows,
        fold_constant,
        global_pools,
        legalize_bf16_norms,
        op_patterns,
        outputs_as_params,
        pack_weights,
        pairwise,
        reciprocal,
        reduce_identity,
        reshape_views,
        split_slices,
        winograd,
    )

    gpu = "gpu" in target.keys
    if gpu:
        from tvm.relax.backend.cuda import pipeline as stages
    else:
        from tvm.relax.backend.cpu_generic import pipeline as stages

    # A tensor of known rank and unknown shape (an If's result) gets symbolic dimensions:
    # LegalizeOps lowers nothing on it otherwise.
    passes = [bind_shapes.bind_unknown_shapes()]
    passes.append(pairwise.pairwise())  # ONNX Min/Max/Sum: pairwise ops, not a stack reduced
    passes.append(split_slices.split_slices())  # a slice per part: single-output functions
    passes.append(legalize_bf16_norms.upcast_pass())  # TVM legalizes no bf16 layer norm
    # Inference forms: batch norms folded into the convolutions before them (the rest
    # decomposed into a scale and a shift), and the weights' computations folded.
    # A batch norm left unfolded (after a pool or a concat, before a ReLU) decomposes into
    # ops and a tuple (y, mean, var) its users read y from; that read would end fusion, so
    # the tuple's item is bound to y itself, and the tuple dropped.
    # A pool whose one window covers its map: a global pool (TVM would pad the map to the
    # window: HF EfficientNet's 2560 x 2560 one over a 7 x 7 map, 67 GB).
    passes.append(global_pools.global_pools())
    # Every constant fold builds our kernels for the target (fold_constant: for plain
    # llvm, LLVM aborted on them).
    passes += [
        fold_constant.fold_constant(target),
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
        fold_constant.fold_constant(target),
    ]
    if not gpu:  # convolutions channels-last, for our conv schedules
        passes.append(conv_transpose.blocks_as_conv2d())  # upsampling blocks: 1 x 1 ones
        passes.append(conv_transpose.overlap_add())  # the others: a matmul, an overlap-add
        passes.append(conv.channels_last())  # 3-D ones then as 2-D ones over stacked taps
        passes.append(carried_channels.carried())  # padded channels on to the next convolution
        # Then (on their NWC form) 1-D ones get whole tiles of frames (no masked last tile).
        passes.append(conv_frames.whole_tiles(target))
        # 3 x 3 convolutions over many output tiles: Winograd's F(2 x 2, 3 x 3).
        passes.append(winograd.winograd_convs())
        # Matmuls by a 2-D weight over two symbolic leading axes: on their rows flattened
        # (our matmul rule tiles one leading axis; dlight's on CUDA fuses them already).
        passes.append(flat_rows.flatten_symbolic_rows())
    if not gpu and bf16_matmul.supported(target):  # Relax matmuls, before legalization
        passes.append(bf16_matmul.rewrite_pass(target))
    passes += stages.library_dispatch_passes(target)
    legalizations = reduce_identity.legalizations()  # float max/min from -inf/+inf, not finfo
    legalizations |= reshape_views.legalizations()  # symbolic reshapes stay views
    if not gpu:  # concatenations marked, for concat_in_place
        legalizations |= concat_in_place.legalizations()
    if fast_math:  # sigmoid, silu, gelu as exp/tanh/erf first: their fast forms vectorize
        passes += [activations.expand_activations(), relax.transform.FastMathTransform()]
        passes.append(reciprocal.divide_by_constants())  # x / c -> x * (1 / c)
        legalizations |= reciprocal.legalizations()  # quantize by a reciprocal scale
    passes.append(relax.transform.LegalizeOps(customize_legalize_map=legalizations))
    # TVM's stages after its own LegalizeOps (ours above legalized the rest, and what it
    # kept, the symbolic reshapes, must stay).
    # On CUDA our pass applies dlight's rules in place of its ApplyDefaultSchedule, passing
    # over a rule that raises on a function (cpu_schedule.gpu_schedule).
    replaced = ("LegalizeOps", "ApplyDefaultSchedule")
    ours = {
        "FoldConstant": fold_constant.fold_constant(target),
        "AnnotateTIROpPattern": op_patterns.annotate_op_patterns(),  # pads at symbolic sizes fuse too
    }
    passes += [ours.get(p.info.name, p) for p in stages.legalize_passes(target) if p.info.name not in replaced]
    if gpu:
        passes.append(cpu_schedule.gpu_schedule(target))
    else:
        passes.append(pack_weights.pack_matmul_weights(target))
        # The parts of a concatenation written into it by the calls that make them.
        passes.append(concat_in_place.concat_in_place())
        if tuner is not None:  # tuned records first; our rules skip what they scheduled
            passes += tuner.passes(target)
        passes.append(cpu_schedule.cpu_schedule(target, record))
    # TVM's RewriteDataflowReshape as ours: its test of a function can abort the compile
    # (reshape_views.dataflow_reshapes).
    passes += [
        reshape_views.dataflow_reshapes() if p.info.name == "RewriteDataflowReshape" else p
        for p in stages.dataflow_lower_passes(target)
    ]
    if not gpu:  # main's outputs in buffers of their own, and main_out writing into the caller's
        passes.append(outputs_as_params.outputs_as_params())
    for finalize in stages.finalize_passes(target):
        passes.append(finalize)
        if finalize.info.name == "StaticPlanBlockMemory":  # storages of symbolic size shared too
            passes.append(memory_plan.share_symbolic_storage())
        if finalize.info.name == "VMShapeLower":  # its shape functions' stores in slot order
            passes.append(shape_funcs.ordered_shape_funcs())
        if storage is not None and finalize.info.name == "LowerAllocTensor":
            passes.append(memory_plan.record_storage(storage))  # every allocation now explicit

    @tvm.transform.module_pass(opt_level=0, name="RewriterPipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline
