"""The model zoo of ``benchmarks/zoo.py``: which models, their inputs, their run sizes.

45 architectures in 10 families, each a small random-weight model built by
:mod:`benchmarks.zoo_builders` from a ``transformers`` config or from ``torchvision``
(``weights=None``):

* text encoders: BERT, DistilBERT, RoBERTa, ALBERT, DeBERTa-v2;
* decoders: GPT-2, and the Llama family with grouped-query (Llama, Qwen2, Mistral:
  4 query / 2 key-value heads) or multi-query attention (Gemma: 1 key-value head), and
  Phi-3, and BLOOM (ALiBi). They run one prefill of 128 tokens without a KV cache and return the logits;
* encoder-decoder: the T5 encoder alone, and BART's full forward (encoder, and the
  decoder over 32 teacher-forced tokens with cross-attention, no cache). A decoder step
  with past key-values is left out: exporting transformers' cache objects as graph
  inputs needs per-exporter glue that users of these exporters do not write;
* ViT-style: ViT, DeiT, CLIP's vision tower, torchvision's ViT-B/16 (2 layers), BEiT
  (relative position biases), LeViT-128S (attention biases, a convolutional stem);
* Swin; segmentation: SegFormer (with a Resize in the decode head), DeepLabV3 and LR-ASPP
  (MobileNetV3-large; atrous convolutions, bilinear upsampling), and a U-Net (transposed
  convolutions, skip concatenations);
* CNNs: ResNet-18, MobileNetV3-small, MobileNetV2, EfficientNet-B0, RegNetY-400MF, ShuffleNetV2 (x1.0),
  DenseNet-121, ResNeXt (32 groups of 4), ConvNeXt, BiT (group norms), GoogLeNet,
  SqueezeNet 1.1, EfficientNetV2-S, MobileViT-XXS (transformers over unfolded patches);
* video: torchvision's R3D-18 (3-D convolutions, clips of 8 frames of 112 x 112);
* speech: wav2vec2 (1 s of 16 kHz audio), Whisper's encoder (80 x 3000 mel frames) and
  a wav2vec2 conformer (rotary positions, depthwise convolutions);
* recurrent: a 2-layer bidirectional LSTM and a 2-layer GRU over mel frames (ONNX's
  ``LSTM`` and ``GRU`` ops, lowered by :mod:`rewriter.backends.tvm.recurrent`).

Symbolic axes: ``batch`` everywhere, ``sequence`` (128 at run time) for text and the
recurrent models' frames, and ``samples`` (16000) for wav2vec2 and its conformer; image
sizes, Whisper's frames and BART's decoder length are fixed, as in the models' own
configs (a clip's frames too).

>>> [model.name for model in select(["cnn"])][:2]
['resnet18', 'mobilenet_v3_small']
>>> feeds(MODELS["bert"], batch=1)["input_ids"].shape
(1, 128)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from benchmarks import zoo_builders as build

SEED = 0


@dataclasses.dataclass(frozen=True)
class Input:
    """One graph input: its axes (an int is fixed, a str names a symbolic axis) and what
    it holds: ``ids`` (token ids below ``high``), ``mask`` (ones) or ``float`` (N(0, 1))."""

    name: str
    axes: tuple[int | str, ...]
    kind: str = "float"
    high: int = build.VOCAB


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A zoo entry: ``make()`` builds the seeded module whose ``forward`` takes the
    ``inputs`` by name and returns the one output ``output``; ``sizes`` are the run sizes
    of the symbolic axes other than ``batch``."""

    name: str
    family: str
    inputs: tuple[Input, ...]
    output: str
    make: Callable[[], Any]
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    note: str = ""

    def key(self) -> str:
        """The name plus a hash of what its export depends on (the export cache's key):
        the builder's source, the shared sizes, the inputs, and the versions of torch,
        transformers, torchvision and onnxscript."""
        from importlib.metadata import version

        parts = [inspect.getsource(self.make), repr(build.TEXT), repr(self.inputs)]
        for package in ("torch", "transformers", "torchvision", "onnxscript"):
            with contextlib.suppress(Exception):
                parts.append(version(package))
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]
        return f"{self.name}-{digest}"


_TOKENS = (
    Input("input_ids", ("batch", "sequence"), "ids"),
    Input("attention_mask", ("batch", "sequence"), "mask"),
)
_SEQUENCE = {"sequence": 128}
_IMAGE = (Input("pixel_values", ("batch", 3, 224, 224)),)
_TV_IMAGE = (Input("images", ("batch", 3, 224, 224)),)


def _text(name: str, family: str, make: Callable[[], Any], output: str, note: str = "") -> ZooModel:
    return ZooModel(name, family, _TOKENS, output, make, _SEQUENCE, note)


def _image(
    name: str, family: str, make: Callable[[], Any], output: str, note: str = ""
) -> ZooModel:
    return ZooModel(name, family, _IMAGE, output, make, {}, note)


def _tv(name: str, family: str, make: Callable[[], Any], note: str = "") -> ZooModel:
    return ZooModel(name, family, _TV_IMAGE, "logits", make, {}, note)


ZOO: list[ZooModel] = [
    _text("bert", "text-encoder", build.bert, "last_hidden_state"),
    _text("distilbert", "text-encoder", build.distilbert, "last_hidden_state"),
    _text("roberta", "text-encoder", build.roberta, "last_hidden_state"),
    _text(
        "albert", "text-encoder", build.albert, "last_hidden_state", "embedding 128, shared layers"
    ),
    _text(
        "deberta_v2", "text-encoder", build.deberta_v2, "last_hidden_state", "relative attention"
    ),
    _text("gpt2", "decoder", build.gpt2, "logits", "MHA, GELU tanh"),
    _text("llama", "decoder", build.llama, "logits", "GQA 4/2 heads"),
    _text("qwen2", "decoder", build.qwen2, "logits", "GQA 4/2 heads, qkv bias"),
    _text("mistral", "decoder", build.mistral, "logits", "GQA 4/2 heads"),
    _text("phi3", "decoder", build.phi3, "logits", "fused qkv, MHA"),
    _text("gemma", "decoder", build.gemma, "logits", "MQA 4/1 heads"),
    _text("bloom", "decoder", build.bloom, "logits", "ALiBi, MHA"),
    _text("t5_encoder", "encoder-decoder", build.t5_encoder, "last_hidden_state", "encoder only"),
    ZooModel(
        "bart",
        "encoder-decoder",
        (*_TOKENS, Input("decoder_input_ids", ("batch", 32), "ids")),
        "last_hidden_state",
        build.bart,
        _SEQUENCE,
        "encoder + decoder over 32 tokens, no cache",
    ),
    _image("vit", "vision-transformer", build.vit, "logits", "197 tokens"),
    _image("deit", "vision-transformer", build.deit, "logits", "198 tokens, distillation head"),
    _image(
        "clip_vision",
        "vision-transformer",
        build.clip_vision,
        "image_embeds",
        "patch 32: 50 tokens",
    ),
    _tv("tv_vit_b_16", "vision-transformer", build.torchvision_vit, "ViT-B/16 widths, 2 layers"),
    _image("beit", "vision-transformer", build.beit, "logits", "relative position bias"),
    _image(
        "levit", "vision-transformer", build.levit, "logits", "LeViT-128S: attention biases, hardswish"
    ),
    _image("swin", "swin", build.swin, "logits", "embed 48, depths 2-2"),
    _image("segformer", "segmentation", build.segformer, "logits", "MiT-B0 widths, 1 block/stage"),
    _tv("deeplabv3", "segmentation", build.deeplabv3, "MobileNetV3-large, atrous rates 12/24/36"),
    _tv("lraspp", "segmentation", build.lraspp, "MobileNetV3-large, bilinear upsampling"),
    _tv("unet", "segmentation", build.unet, "2 x 2 transposed convolutions up, skip concats"),
    _tv("resnet18", "cnn", build.torchvision_model("resnet18")),
    _tv("mobilenet_v3_small", "cnn", build.torchvision_model("mobilenet_v3_small")),
    _tv("mobilenet_v2", "cnn", build.torchvision_model("mobilenet_v2"), "ReLU6: Clip(0, 6)"),
    _tv("efficientnet_b0", "cnn", build.torchvision_model("efficientnet_b0")),
    _tv("regnet_y_400mf", "cnn", build.torchvision_model("regnet_y_400mf"), "grouped convs, SE"),
    _tv(
        "shufflenet_v2",
        "cnn",
        build.torchvision_model("shufflenet_v2_x1_0"),
        "channel shuffle, 58/116-channel branches",
    ),
    _tv("densenet121", "cnn", build.torchvision_model("densenet121"), "concats of growing maps"),
    _tv("resnext", "cnn", build.resnext, "ResNeXt-50 32x4d widths, 1 block/stage: 32 groups"),
    _tv("convnext", "cnn", build.convnext, "ConvNeXt-T widths, 1 block/stage"),
    _image("bit", "cnn", build.bit, "logits", "BiT ResNetV2-50 widths, 1 block/stage: group norms"),
    _tv("googlenet", "cnn", build.torchvision_model("googlenet", aux_logits=False, init_weights=True)),
    _tv("squeezenet", "cnn", build.torchvision_model("squeezenet1_1"), "fire modules, ceil-mode pools"),
    _tv("efficientnet_v2_s", "cnn", build.torchvision_model("efficientnet_v2_s"), "fused MBConv"),
    _image("mobilevit", "cnn", build.mobilevit, "logits", "MobileViT-XXS widths: attention over patches"),
    ZooModel(
        "r3d_18",
        "video",
        (Input("images", ("batch", 3, 8, 112, 112)),),
        "logits",
        build.r3d_18,
        {},
        "R3D-18: 3-D convolutions over 8 frames of 112 x 112",
    ),
    ZooModel(
        "wav2vec2",
        "speech",
        (Input("input_values", ("batch", "samples")),),
        "last_hidden_state",
        build.wav2vec2,
        {"samples": 16000},
        "1 s of 16 kHz audio: 49 frames",
    ),
    ZooModel(
        "whisper_encoder",
        "speech",
        (Input("input_features", ("batch", 80, 3000)),),
        "last_hidden_state",
        build.whisper_encoder,
        {},
        "80 x 3000 mel frames: 1500 tokens",
    ),
    ZooModel(
        "wav2vec2_conformer",
        "speech",
        (Input("input_values", ("batch", "samples")),),
        "last_hidden_state",
        build.wav2vec2_conformer,
        {"samples": 16000},
        "conformer layers: rotary positions, depthwise convolution of 31 taps",
    ),
    ZooModel(
        "lstm",
        "recurrent",
        (Input("input_features", ("batch", "sequence", 80)),),
        "logits",
        build.lstm,
        _SEQUENCE,
        "2-layer bidirectional LSTM, 256 wide, over 128 frames of 80 mel features",
    ),
    ZooModel(
        "gru",
        "recurrent",
        (Input("input_features", ("batch", "sequence", 80)),),
        "logits",
        build.gru,
        _SEQUENCE,
        "2-layer GRU, 256 wide, over 128 frames of 80 mel features",
    ),
]
_AUDIO = (Input("input_values", ("batch", "samples")),)
_SAMPLES = {"samples": 16000}
_IDS = (Input("input_ids", ("batch", "sequence"), "ids"),)
# Models whose code reads the sequence length as a Python int (pooling strides, chunked
# windows, an unrolled scan): both exporters bake the traced length into the graph, so
# their sequence is fixed at 128 and only the batch is symbolic.
_TOKENS_128 = (Input("input_ids", ("batch", 128), "ids"), Input("attention_mask", ("batch", 128), "mask"))

# More architectures, run by name or with ``--models survey`` (not in the default run,
# whose table the README keeps): what a new user brings that the zoo above lacks.
SURVEY: list[ZooModel] = [
    _text("electra", "survey", build.electra, "last_hidden_state", "embeddings of 128 projected"),
    _text("mpnet", "survey", build.mpnet, "last_hidden_state", "relative position buckets"),
    _text("modernbert", "survey", build.modernbert, "last_hidden_state", "rotary, GeGLU, local attention"),
    _text("mobilebert", "survey", build.mobilebert, "last_hidden_state", "bottlenecks, NoNorm"),
    _text("roformer", "survey", build.roformer, "last_hidden_state", "rotary positions"),
    _text("opt", "survey", build.opt, "logits", "ReLU FFN, learned positions"),
    _text("gpt_neox", "survey", build.gpt_neox, "logits", "partial rotary, parallel MLP"),
    _text("falcon", "survey", build.falcon, "logits", "multi-query attention"),
    _image("dinov2", "survey", build.dinov2, "pooler_output", "patch 14: 257 tokens"),
    _image("convnextv2", "survey", build.convnextv2, "logits", "global response norm"),
    _image("poolformer", "survey", build.poolformer, "logits", "pooling as token mixer"),
    _image("pvt_v2", "survey", build.pvt_v2, "logits", "spatial-reduction attention"),
    _image("mobilevitv2", "survey", build.mobilevitv2, "logits", "linear attention, Col2Im"),
    _image("focalnet", "survey", build.focalnet, "logits", "focal modulation"),
    _image("hiera", "survey", build.hiera, "logits", "mask-unit attention"),
    _image("siglip_vision", "survey", build.siglip_vision, "pooler_output", "attention-pooling head"),
    _image("yolos", "survey", build.yolos, "last_hidden_state", "ViT + 100 detection tokens"),
    ZooModel("wavlm", "survey", _AUDIO, "last_hidden_state", build.wavlm, _SAMPLES, "gated relative bias"),
    ZooModel("hubert", "survey", _AUDIO, "last_hidden_state", build.hubert, _SAMPLES),
    ZooModel(
        "ast",
        "survey",
        (Input("input_values", ("batch", 1024, 128)),),
        "logits",
        build.ast,
        {},
        "1024 x 128 filterbanks: 1212 patches",
    ),
    ZooModel(
        "speech_to_text",
        "survey",
        (Input("input_features", ("batch", 584, 80)),),
        "last_hidden_state",
        build.speech_to_text,
        {},
        "conv subsampling with GLU",
    ),
    _tv("inception_v3", "survey", build.torchvision_model("inception_v3", aux_logits=False, init_weights=True)),
    _tv("mnasnet", "survey", build.torchvision_model("mnasnet1_0")),
    _tv("vgg11", "survey", build.torchvision_model("vgg11_bn")),
    _tv("swin_v2_t", "survey", build.torchvision_model("swin_v2_t"), "log-spaced continuous position bias"),
    _tv("maxvit_t", "survey", build.torchvision_model("maxvit_t"), "block and grid attention, MBConv"),
    _tv("wide_resnet50", "survey", build.torchvision_model("wide_resnet50_2")),
    # The second probe: operators the first did not reach.
    ZooModel("fnet", "survey", _IDS, "last_hidden_state", build.fnet, _SEQUENCE, "2-D Fourier token mixing"),
    _text("squeezebert", "survey", build.squeezebert, "last_hidden_state", "grouped 1-D convolutions"),
    _text("convbert", "survey", build.convbert, "last_hidden_state", "span-based dynamic convolution"),
    ZooModel("funnel", "survey", _TOKENS_128, "last_hidden_state", build.funnel, {}, "sequence pooled, relative attention"),
    ZooModel("canine", "survey", _TOKENS_128, "last_hidden_state", build.canine, {}, "hashed characters, strided conv down"),
    _text("esm", "survey", build.esm, "last_hidden_state", "rotary, token-dropout rescaling"),
    _text("mixtral", "survey", build.mixtral, "logits", "4 experts, top-2 routing"),
    _text("xlnet", "survey", build.xlnet, "last_hidden_state", "two-stream relative attention"),
    ZooModel("mamba", "survey", (Input("input_ids", ("batch", 128), "ids"),), "last_hidden_state", build.mamba, {},
             "selective scan, unrolled over 128 tokens"),  # fmt: skip
    ZooModel("nystromformer", "survey", _TOKENS_128, "last_hidden_state", build.nystromformer, {}, "landmarks, iterative pinv"),
    ZooModel("longformer", "survey", _TOKENS_128, "last_hidden_state", build.longformer, {}, "sliding-window chunks of 32"),
    _image("detr", "survey", build.detr, "logits", "ResNet backbone, 100 object queries"),
    _image("deformable_detr", "survey", build.deformable_detr, "logits", "multi-scale deformable attention"),
    _image("dpt", "survey", build.dpt, "logits", "ViT reassembled at four scales"),
    _image("sam_vision", "survey", build.sam_vision, "last_hidden_state", "windows, decomposed relative positions"),
    _image("cvt", "survey", build.cvt, "logits", "convolutional projections"),
    _image("mobilenet_v1", "survey", build.mobilenet_v1, "logits", "TensorFlow 'same' padding"),
    _image("swiftformer", "survey", build.swiftformer, "logits", "efficient additive attention"),
    ZooModel(
        "timesformer",
        "survey",
        (Input("pixel_values", ("batch", 8, 3, 224, 224)),),
        "last_hidden_state",
        build.timesformer,
        {},
        "divided space-time attention, 8 frames",
    ),
    ZooModel(
        "encodec",
        "survey",
        (Input("input_values", ("batch", 1, "samples")),),
        "audio_values",
        build.encodec,
        {"samples": 24000},
        "1 s of 24 kHz audio: conv, LSTM, RVQ codebooks, back",
    ),
    ZooModel("sew_d", "survey", _AUDIO, "last_hidden_state", build.sew_d, _SAMPLES, "disentangled attention"),
    ZooModel(
        "patchtst",
        "survey",
        (Input("past_values", ("batch", 512, 7)),),
        "prediction_outputs",
        build.patchtst,
        {},
        "7 series x 512 steps in patches of 16",
    ),
    # The third probe (thirty-fifth session).
    _text("gpt_bigcode", "survey", build.gpt_bigcode, "logits", "multi-query attention, fused QKV"),
    ZooModel(
        "videomae",
        "survey",
        (Input("pixel_values", ("batch", 8, 3, 224, 224)),),
        "last_hidden_state",
        build.videomae,
        {},
        "tubelets: a strided 3-D convolution",
    ),
    ZooModel("data2vec_audio", "survey", _AUDIO, "last_hidden_state", build.data2vec_audio, _SAMPLES, "five positional convolutions"),
    _image("depth_anything", "survey", build.depth_anything, "predicted_depth", "DINOv2 + DPT head"),
    _image("glpn", "survey", build.glpn, "predicted_depth", "selective feature fusion"),
    _image("upernet", "survey", build.upernet, "logits", "pyramid pooling to 1, 2, 3, 6"),
    ZooModel("swin2sr", "survey", (Input("pixel_values", ("batch", 3, 64, 64)),), "reconstruction", build.swin2sr, {},
             "x2 super-resolution, pixel shuffle"),  # fmt: skip
    ZooModel("hifigan", "survey", (Input("spectrogram", ("batch", "sequence", 80)),), "waveform", build.hifigan,
             {"sequence": 100}, "mel frames to a waveform: transposed 1-D convolutions"),  # fmt: skip
    ZooModel("dac", "survey", (Input("input_values", ("batch", 1, "samples")),), "audio_values", build.dac,
             {"samples": 16000}, "snake activations, 4 codebooks"),  # fmt: skip
    ZooModel("mimi", "survey", (Input("input_values", ("batch", 1, "samples")),), "audio_values", build.mimi,
             {"samples": 24000}, "convolutions around a transformer"),  # fmt: skip
    ZooModel("recurrent_gemma", "survey", _TOKENS_128, "logits", build.recurrent_gemma, {},
             "RG-LRU recurrences unrolled over 128 tokens"),  # fmt: skip
    _image("rt_detr", "survey", build.rt_detr, "logits", "hybrid encoder, top-k queries"),
    # The fourth probe (thirty-seventh session).
    ZooModel("raft_small", "survey", (Input("image1", ("batch", 3, 224, 224)), Input("image2", ("batch", 3, 224, 224))),
             "flow", build.raft_small, {}, "optical flow: correlation lookups by grid_sample"),  # fmt: skip
    _image("mask2former", "survey", build.mask2former, "masks_queries_logits", "deformable pixel decoder, masked attention"),
]
MODELS = {model.name: model for model in [*ZOO, *SURVEY]}


# --- Inputs --------------------------------------------------------------------------


def feeds(
    model: ZooModel, batch: int, *, sizes: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded run inputs: ``batch``, and ``sizes`` (default: the model's run sizes) for
    the other symbolic axes.

    >>> {k: v.shape for k, v in feeds(MODELS["wav2vec2"], 8).items()}
    {'input_values': (8, 16000)}
    """
    chosen = {"batch": batch} | (model.sizes if sizes is None else sizes)
    rng = np.random.default_rng(SEED)
    arrays = {}
    for spec in model.inputs:
        shape = [axis if isinstance(axis, int) else chosen[axis] for axis in spec.axes]
        if spec.kind == "ids":
            arrays[spec.name] = rng.integers(0, spec.high, shape, dtype=np.int64)
        elif spec.kind == "mask":
            arrays[spec.name] = np.ones(shape, dtype=np.int64)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return arrays


def symbolic_axes(model: ZooModel) -> list[str]:
    """The names of the model's symbolic axes, ``batch`` first."""
    names: list[str] = []
    for spec in model.inputs:
        names += [axis for axis in spec.axes if isinstance(axis, str) and axis not in names]
    return names


def select(names: Iterable[str] | None) -> list[ZooModel]:
    """The zoo's models named in ``names`` (model or family names, ``survey`` for
    :data:`SURVEY`), in zoo order; the zoo without the survey for None. An unknown name
    raises ``KeyError`` listing the known ones."""
    if names is None:
        return list(ZOO)
    wanted = set(names)
    every = [*ZOO, *SURVEY]
    known = set(MODELS) | {model.family for model in every}
    unknown = sorted(wanted - known)
    if unknown:
        raise KeyError(f"unknown models {unknown}; known: {sorted(known)}")
    return [model for model in every if model.name in wanted or model.family in wanted]
