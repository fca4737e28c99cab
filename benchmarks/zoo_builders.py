"""Builders of the zoo's models: seeded random weights, one tensor out.

Each builder returns an ``nn.Module`` in eval mode whose ``forward`` takes the model's
inputs by name (they become the ONNX input names) and returns one tensor. Sizes, each
what a user would try first:

* text: hidden 256, 4 heads (head dim 64), FFN 1024, 2 layers, vocabulary 1000 (so the
  LM heads of the decoders do not dominate; 1000 is not a multiple of 16, as real
  vocabularies mostly are not); eager attention;
* vision transformers: 224 x 224 images, the text widths; torchvision's ViT-B/16 with
  its own widths and 2 layers;
* CNNs: torchvision's as they are (``weights=None``), BatchNorm statistics calibrated
  (:func:`_calibrate_batch_norm`); ConvNeXt with ConvNeXt-T's widths and ResNeXt with
  ResNeXt-50 32x4d's, one block a stage;
* speech: wav2vec2 with a 256-channel conv front end; Whisper's encoder at the text
  widths with its full 80 x 3000 mel input.

>>> module = _bert()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from examples.torchvision_shim import install as install_torchvision_shim

SEED = 0
VOCAB = 1000
TEXT = {"hidden": 256, "heads": 4, "ffn": 1024, "layers": 2, "positions": 512}
# The text widths under the names most transformers configs give them.
HF_WIDTHS = {
    "hidden_size": TEXT["hidden"],
    "num_hidden_layers": TEXT["layers"],
    "num_attention_heads": TEXT["heads"],
    "intermediate_size": TEXT["ffn"],
}


# --- Wrappers: named tensor inputs in, one tensor out -------------------------------


@functools.cache
def _wrappers() -> dict[str, Any]:
    """The wrapper class per input signature. ``forward``'s parameter names become the
    ONNX input names (and the keys of dynamo's ``dynamic_shapes``), so each is spelled
    out; they are built on first use so that importing this file needs no torch."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, model: Any, field: str | None, fixed: dict[str, Any]) -> None:
            super().__init__()
            self.model, self.field, self.fixed = model, field, fixed

        def out(self, *args: Any, **kwargs: Any) -> Any:
            output = self.model(*args, **kwargs, **self.fixed)
            if self.field is None:
                return output
            # A model output's field, or a dict's entry (torchvision's segmentation models).
            return getattr(output, self.field) if hasattr(output, self.field) else output[self.field]

    class Text(Wrapped):
        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.out(input_ids=input_ids, attention_mask=attention_mask)

    class Seq2Seq(Wrapped):
        def forward(self, input_ids: Any, attention_mask: Any, decoder_input_ids: Any) -> Any:
            return self.out(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
            )

    class Pixels(Wrapped):
        def forward(self, pixel_values: Any) -> Any:
            return self.out(pixel_values=pixel_values)

    class Images(Wrapped):
        def forward(self, images: Any) -> Any:
            return self.out(images)

    class Audio(Wrapped):
        def forward(self, input_values: Any) -> Any:
            return self.out(input_values=input_values)

    class Mel(Wrapped):
        def forward(self, input_features: Any) -> Any:
            return self.out(input_features=input_features)

    class Ids(Wrapped):
        def forward(self, input_ids: Any) -> Any:
            return self.out(input_ids=input_ids)

    class Series(Wrapped):
        def forward(self, past_values: Any) -> Any:
            return self.out(past_values=past_values)

    class Spectrogram(Wrapped):
        def forward(self, spectrogram: Any) -> Any:
            return self.out(spectrogram)

    class Frames(Wrapped):
        def forward(self, image1: Any, image2: Any) -> Any:
            return self.out(image1, image2)[-1]  # optical flow: the last refinement

    return {
        "text": Text,
        "seq2seq": Seq2Seq,
        "pixels": Pixels,
        "images": Images,
        "audio": Audio,
        "mel": Mel,
        "ids": Ids,
        "series": Series,
        "spectrogram": Spectrogram,
        "frames": Frames,
    }


def _wrap(model: Any, field: str | None, signature: str, **fixed: Any) -> Any:
    """``model`` behind the ``forward`` of ``signature`` (a key of :func:`_wrappers`),
    called with ``fixed`` keyword arguments too, returning ``output.field`` or
    ``output[field]`` (or the output itself when ``field`` is None)."""
    return _wrappers()[signature](model, field, fixed).eval()


def _seeded() -> None:
    install_torchvision_shim()  # transformers imports torchvision when it is installed
    import torch

    torch.manual_seed(SEED)


# --- Builders ------------------------------------------------------------------------


def bert() -> Any:
    _seeded()
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        **HF_WIDTHS,
        max_position_embeddings=TEXT["positions"],
        attn_implementation="eager",
    )
    return _wrap(BertModel(config, add_pooling_layer=False), "last_hidden_state", "text")


def distilbert() -> Any:
    _seeded()
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=TEXT["hidden"],
        n_layers=TEXT["layers"],
        n_heads=TEXT["heads"],
        hidden_dim=TEXT["ffn"],
        max_position_embeddings=TEXT["positions"],
        attn_implementation="eager",
    )
    return _wrap(DistilBertModel(config), "last_hidden_state", "text")


def roberta() -> Any:
    _seeded()
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=VOCAB,
        **HF_WIDTHS,
        max_position_embeddings=TEXT["positions"] + 2,
        attn_implementation="eager",
    )
    return _wrap(RobertaModel(config, add_pooling_layer=False), "last_hidden_state", "text")


def albert() -> Any:
    _seeded()
    from transformers import AlbertConfig, AlbertModel

    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=128,
        **HF_WIDTHS,
        max_position_embeddings=TEXT["positions"],
        attn_implementation="eager",
    )
    return _wrap(AlbertModel(config, add_pooling_layer=False), "last_hidden_state", "text")


def deberta_v2() -> Any:
    _seeded()
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(
        vocab_size=VOCAB,
        **HF_WIDTHS,
        max_position_embeddings=TEXT["positions"],
        relative_attention=True,
        position_buckets=64,
        pos_att_type=["p2c", "c2p"],
        attn_implementation="eager",
    )
    return _wrap(DebertaV2Model(config), "last_hidden_state", "text")


def gpt2() -> Any:
    _seeded()
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=TEXT["hidden"],
        n_layer=TEXT["layers"],
        n_head=TEXT["heads"],
        n_inner=TEXT["ffn"],
        n_positions=TEXT["positions"],
        bos_token_id=0,  # the defaults (50256) lie outside the small vocabulary
        eos_token_id=0,
        attn_implementation="eager",
    )
    return _wrap(GPT2LMHeadModel(config), "logits", "text", use_cache=False)


def _causal_lm(config_name: str, model_name: str, **options: Any) -> Any:
    """A Llama-family causal LM (RoPE, RMSNorm, gated MLP) at the text sizes."""
    _seeded()
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=VOCAB,
        **HF_WIDTHS,
        max_position_embeddings=TEXT["positions"],
        use_cache=False,
        attn_implementation="eager",
        **options,
    )
    model = getattr(transformers, model_name)(config)
    return _wrap(model, "logits", "text", use_cache=False)


def llama() -> Any:
    return _causal_lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)


def qwen2() -> Any:
    return _causal_lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2)


def mistral() -> Any:
    return _causal_lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=2)


def phi3() -> Any:
    return _causal_lm(
        "Phi3Config", "Phi3ForCausalLM", num_key_value_heads=4, pad_token_id=0, eos_token_id=0
    )


def gemma() -> Any:
    return _causal_lm("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=1, head_dim=64)


def t5_encoder() -> Any:
    _seeded()
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=VOCAB,
        d_model=TEXT["hidden"],
        d_kv=TEXT["hidden"] // TEXT["heads"],
        d_ff=TEXT["ffn"],
        num_layers=TEXT["layers"],
        num_heads=TEXT["heads"],
        attn_implementation="eager",
    )
    return _wrap(T5EncoderModel(config), "last_hidden_state", "text")


def bart() -> Any:
    _seeded()
    from transformers import BartConfig, BartModel

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=TEXT["hidden"],
        encoder_layers=TEXT["layers"],
        decoder_layers=TEXT["layers"],
        encoder_attention_heads=TEXT["heads"],
        decoder_attention_heads=TEXT["heads"],
        encoder_ffn_dim=TEXT["ffn"],
        decoder_ffn_dim=TEXT["ffn"],
        max_position_embeddings=TEXT["positions"],
        use_cache=False,
        attn_implementation="eager",
    )
    return _wrap(BartModel(config), "last_hidden_state", "seq2seq", use_cache=False)


def vit() -> Any:
    _seeded()
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=224,
        patch_size=16,
        **HF_WIDTHS,
        num_labels=1000,
        attn_implementation="eager",
    )
    return _wrap(ViTForImageClassification(config), "logits", "pixels")


def deit() -> Any:
    _seeded()
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    config = DeiTConfig(
        image_size=224,
        patch_size=16,
        **HF_WIDTHS,
        num_labels=1000,
        attn_implementation="eager",
    )
    return _wrap(DeiTForImageClassificationWithTeacher(config), "logits", "pixels")


def clip_vision() -> Any:
    _seeded()
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        image_size=224,
        patch_size=32,
        **HF_WIDTHS,
        projection_dim=256,
        attn_implementation="eager",
    )
    return _wrap(CLIPVisionModelWithProjection(config), "image_embeds", "pixels")


def torchvision_vit() -> Any:
    """torchvision's ViT-B/16 widths with 2 layers; its zero-initialised head (every
    output 0 with ``weights=None``) is re-initialised."""
    _seeded()
    import torch
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=224, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768, mlp_dim=3072
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    torch.nn.init.normal_(model.heads.head.bias, std=0.02)
    return _wrap(model, None, "images")


def swin() -> Any:
    _seeded()
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=48,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=7,
        num_labels=1000,
        attn_implementation="eager",
    )
    return _wrap(SwinForImageClassification(config), "logits", "pixels")


def segformer() -> Any:
    """SegFormer-B0's widths (MiT-B0) with one block per stage, 19 classes."""
    _seeded()
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[32, 64, 160, 256],
        decoder_hidden_size=256,
        num_labels=19,
        attn_implementation="eager",
    )
    return _wrap(SegformerForSemanticSegmentation(config), "logits", "pixels")


def deeplabv3() -> Any:
    """torchvision's DeepLabV3 on MobileNetV3-large (21 classes, output stride 16: an
    atrous pyramid at rates 12, 24 and 36 over a 14 x 14 map), its ``out`` map."""
    _seeded()
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    return _wrap(_calibrate_batch_norm(model), "out", "images")


def torchvision_model(name: str, **options: Any) -> Callable[[], Any]:
    def build() -> Any:
        _seeded()
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, **options)
        return _wrap(_calibrate_batch_norm(model), None, "images")

    build.__qualname__ = f"torchvision_{name}"
    return build


def _calibrate_batch_norm(model: Any, images: tuple[int, ...] = (4, 3, 224, 224)) -> Any:
    """Set the BatchNorm statistics from two batches of N(0, 1) ``images`` (cumulative
    averages), then switch to eval mode.

    With the initial statistics (mean 0, variance 1) the eval-mode BatchNorms scale
    nothing, and the outputs of MobileNetV3 and EfficientNet fade to 1e-10 and 1e-14:
    every error relative to them is noise. Calibrated, they are of order 1.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*images))
    return model.eval()


def r3d_18() -> Any:
    """torchvision's R3D-18 video classifier (3-D convolutions), calibrated on clips of
    8 frames of 112 x 112."""
    _seeded()
    import torchvision

    model = torchvision.models.video.r3d_18(weights=None)
    return _wrap(_calibrate_batch_norm(model, (2, 3, 8, 112, 112)), None, "images")


def convnext() -> Any:
    """torchvision's ConvNeXt with ConvNeXt-T's widths and one block per stage."""
    _seeded()
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [(96, 192), (192, 384), (384, 768), (768, None)]
    model = ConvNeXt([CNBlockConfig(width, out, 1) for width, out in stages])
    return _wrap(model, None, "images")


def resnext() -> Any:
    """torchvision's ResNeXt-50 32x4d widths (32 groups of 4 channels in the first stage's
    3 x 3 convolutions, up to 32 of 32 in the last), one bottleneck block per stage."""
    _seeded()
    from torchvision.models.resnet import Bottleneck, ResNet

    model = ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4)
    return _wrap(_calibrate_batch_norm(model), None, "images")


def bit() -> Any:
    """Big Transfer's ResNetV2-50 widths (pre-activation bottlenecks, group norms of 32
    groups, weight-standardized convolutions), one block per stage."""
    _seeded()
    from transformers import BitConfig, BitForImageClassification

    config = BitConfig(depths=[1, 1, 1, 1], num_labels=1000)
    return _wrap(BitForImageClassification(config), "logits", "pixels")


def wav2vec2() -> Any:
    """wav2vec2 with a 256-channel conv feature encoder (the base model's strides and
    kernels: one frame per 320 samples), group norm, 2 transformer layers."""
    _seeded()
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        **HF_WIDTHS,
        conv_dim=(256,) * 7,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        attn_implementation="eager",
    )
    return _wrap(Wav2Vec2Model(config), "last_hidden_state", "audio")


def whisper_encoder() -> Any:
    _seeded()
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig(
        d_model=TEXT["hidden"],
        encoder_layers=TEXT["layers"],
        encoder_attention_heads=TEXT["heads"],
        encoder_ffn_dim=TEXT["ffn"],
        num_mel_bins=80,
        max_source_positions=1500,
        attn_implementation="eager",
    )
    return _wrap(WhisperEncoder(config), "last_hidden_state", "mel")


def _recurrent(kind: str, bidirectional: bool) -> Any:
    """An acoustic model on 80 mel features per frame: a linear front to the text width,
    a 2-layer ``nn.LSTM``/``nn.GRU`` of that width, and a linear head of 32 symbols (a
    CTC alphabet). Both exporters write one ONNX ``LSTM``/``GRU`` node per layer."""
    import torch

    class Recurrent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            width = TEXT["hidden"]
            self.front = torch.nn.Linear(80, width)
            self.rnn = getattr(torch.nn, kind)(
                width, width, num_layers=TEXT["layers"], batch_first=True, bidirectional=bidirectional
            )
            self.head = torch.nn.Linear(width * (2 if bidirectional else 1), 32)

        def forward(self, input_features: Any) -> Any:
            hidden, _ = self.rnn(self.front(input_features))
            return self.head(hidden)

    _seeded()
    return Recurrent().eval()


def lstm() -> Any:
    """Bidirectional LSTM (a CTC acoustic model)."""
    return _recurrent("LSTM", bidirectional=True)


def gru() -> Any:
    """Unidirectional GRU (a streaming acoustic model)."""
    return _recurrent("GRU", bidirectional=False)



def unet() -> Any:
    """A U-Net for 2-class segmentation: four stages of two 3 x 3 convolutions with batch
    norms (32 to 256 channels), max pools down, 2 x 2 stride-2 transposed convolutions up,
    each joined to its skip by a concatenation, and a 1 x 1 head at full resolution."""
    import torch
    from torch import nn

    def stage(cin: int, cout: int) -> Any:
        return nn.Sequential(
            *(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()),
            *(nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()),
        )

    class UNet(nn.Module):
        def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
            super().__init__()
            self.down = nn.ModuleList(
                stage(cin, cout) for cin, cout in zip((3, *widths), widths, strict=False)
            )
            ups = widths[-2::-1]
            self.up = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in ups)
            self.merge = nn.ModuleList(stage(2 * w, w) for w in ups)
            self.head = nn.Conv2d(widths[0], 2, 1)

        def forward(self, images: Any) -> Any:
            skips, x = [], images
            for stage_ in self.down[:-1]:
                x = stage_(x)
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
            x = self.down[-1](x)
            for up, merge in zip(self.up, self.merge, strict=True):
                x = merge(torch.cat([up(x), skips.pop()], 1))
            return self.head(x)

    _seeded()
    return _calibrate_batch_norm(UNet())


def lraspp() -> Any:
    """torchvision's LR-ASPP on MobileNetV3-large (21 classes): a sigmoid-gated head on
    the 1/16 map, bilinear upsampling to the 1/8 map and to the image."""
    _seeded()
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    return _wrap(_calibrate_batch_norm(model), "out", "images")


def mobilevit() -> Any:
    """MobileViT-XXS's widths: MobileNetV2 blocks, then transformers over unfolded 2 x 2
    patches (reshapes and transposes in and out), SiLU."""
    _seeded()
    from transformers import MobileViTConfig, MobileViTForImageClassification

    config = MobileViTConfig(
        image_size=224,
        hidden_sizes=[64, 80, 96],
        neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
        num_labels=1000,
    )
    return _wrap(_calibrate_batch_norm(MobileViTForImageClassification(config)), "logits", "pixels")


def levit() -> Any:
    """LeViT-128S: a convolutional stem, attention with learned biases gathered by
    relative offset, shrinking attention between stages, hardswish, batch-normed linears."""
    _seeded()
    from transformers import LevitConfig, LevitForImageClassification

    model = LevitForImageClassification(LevitConfig(num_labels=1000))
    return _wrap(_calibrate_batch_norm(model), "logits", "pixels")


def beit() -> Any:
    """BEiT at the text widths: a relative position bias per layer, layer scale."""
    _seeded()
    from transformers import BeitConfig, BeitForImageClassification

    config = BeitConfig(
        **HF_WIDTHS,
        use_relative_position_bias=True,
        num_labels=1000,
        attn_implementation="eager",
    )
    return _wrap(BeitForImageClassification(config), "logits", "pixels")


def bloom() -> Any:
    """BLOOM at the text widths: ALiBi position biases, an embedding layer norm."""
    _seeded()
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=VOCAB,
        hidden_size=TEXT["hidden"],
        n_layer=TEXT["layers"],
        n_head=TEXT["heads"],
        use_cache=False,
        attn_implementation="eager",
    )
    return _wrap(BloomForCausalLM(config), "logits", "text", use_cache=False)


def wav2vec2_conformer() -> Any:
    """wav2vec2's conv front end (as :func:`wav2vec2`) into 2 conformer layers: rotary
    position embeddings, GLU, a depthwise 1-D convolution of 31 taps, batch norm."""
    _seeded()
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    config = Wav2Vec2ConformerConfig(
        **HF_WIDTHS,
        conv_dim=(256,) * 7,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        position_embeddings_type="rotary",
        attn_implementation="eager",
    )
    model = _calibrate_batch_norm(Wav2Vec2ConformerModel(config), (2, 16000))
    return _wrap(model, "last_hidden_state", "audio")


# --- The survey: more architectures, off the default run (zoo_models.SURVEY) ----------


def _hf(
    config_name: str,
    model_name: str,
    field: str | None,
    signature: str,
    *,
    calibrate: tuple[int, ...] | None = None,
    **options: Any,
) -> Any:
    """A transformers model built from ``config_name(**options)``, eager attention,
    its BatchNorm statistics calibrated on inputs of shape ``calibrate`` when given."""
    _seeded()
    import transformers

    config = getattr(transformers, config_name)(**options)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config)
    if calibrate is not None:
        model = _calibrate_batch_norm(model, calibrate)
    return _wrap(model, field, signature)


_IDS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
_AUDIO_FRONT = {"conv_dim": (256,) * 7, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}


def electra() -> Any:
    """ELECTRA's discriminator: embeddings of 128 projected to the hidden width."""
    return _hf("ElectraConfig", "ElectraModel", "last_hidden_state", "text", vocab_size=VOCAB, embedding_size=128, **HF_WIDTHS)


def mpnet() -> Any:
    """MPNet: relative position buckets added to the scores."""
    return _hf("MPNetConfig", "MPNetModel", "last_hidden_state", "text", vocab_size=VOCAB, **HF_WIDTHS)


def modernbert() -> Any:
    """ModernBERT: rotary positions, GeGLU, alternating local (sliding-window) attention."""
    options = {**_IDS, "cls_token_id": 0, "sep_token_id": 0}
    return _hf("ModernBertConfig", "ModernBertModel", "last_hidden_state", "text", vocab_size=VOCAB, **HF_WIDTHS, **options)


def mobilebert() -> Any:
    """MobileBERT: bottlenecks, stacked FFNs, NoNorm (elementwise affine)."""
    return _hf("MobileBertConfig", "MobileBertModel", "last_hidden_state", "text", vocab_size=VOCAB, num_hidden_layers=2)


def roformer() -> Any:
    """RoFormer: rotary positions on Q and K."""
    return _hf("RoFormerConfig", "RoFormerModel", "last_hidden_state", "text", vocab_size=VOCAB, **HF_WIDTHS)


def opt() -> Any:
    """OPT: learned positions offset by 2, ReLU FFN."""
    widths = {"hidden_size": TEXT["hidden"], "num_hidden_layers": TEXT["layers"], "num_attention_heads": TEXT["heads"]}
    return _hf("OPTConfig", "OPTForCausalLM", "logits", "text", vocab_size=VOCAB, ffn_dim=TEXT["ffn"],
               word_embed_proj_dim=TEXT["hidden"], use_cache=False, **widths, **_IDS)  # fmt: skip


def gpt_neox() -> Any:
    """GPT-NeoX: partial rotary dims, parallel attention and MLP."""
    return _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", "logits", "text", vocab_size=VOCAB, **HF_WIDTHS, use_cache=False, **_IDS)


def falcon() -> Any:
    """Falcon: multi-query attention, parallel attention and MLP."""
    widths = {"hidden_size": TEXT["hidden"], "num_hidden_layers": TEXT["layers"], "num_attention_heads": TEXT["heads"]}
    return _hf("FalconConfig", "FalconForCausalLM", "logits", "text", vocab_size=VOCAB, use_cache=False, **widths, **_IDS)


def dinov2() -> Any:
    """DINOv2: patch 14 (257 tokens), layer scale, interpolated positions."""
    return _hf("Dinov2Config", "Dinov2Model", "pooler_output", "pixels", **HF_WIDTHS, image_size=224, patch_size=14)


def convnextv2() -> Any:
    """ConvNeXt V2 (HF) at ConvNeXt-T widths, one block a stage: global response norm."""
    return _hf("ConvNextV2Config", "ConvNextV2ForImageClassification", "logits", "pixels",
               depths=[1, 1, 1, 1], hidden_sizes=[96, 192, 384, 768])  # fmt: skip


def poolformer() -> Any:
    """PoolFormer: average pooling as the token mixer, group norms."""
    return _hf("PoolFormerConfig", "PoolFormerForImageClassification", "logits", "pixels", depths=[1, 1, 2, 1])


def pvt_v2() -> Any:
    """PVT v2: spatial-reduction attention (keys from a strided conv), depthwise FFN convs."""
    return _hf("PvtV2Config", "PvtV2ForImageClassification", "logits", "pixels", depths=[1, 1, 1, 1])


def mobilevitv2() -> Any:
    """MobileViTV2: separable linear attention, patches unfolded and folded (Col2Im)."""
    return _hf("MobileViTV2Config", "MobileViTV2ForImageClassification", "logits", "pixels",
               calibrate=(4, 3, 224, 224), num_labels=1000)  # fmt: skip


def focalnet() -> Any:
    """FocalNet: focal modulation (depthwise convs and gates) in place of attention."""
    return _hf("FocalNetConfig", "FocalNetForImageClassification", "logits", "pixels", depths=[1, 1, 1, 1])


def hiera() -> Any:
    """Hiera: mask-unit attention over reordered tokens, pooled queries."""
    return _hf("HieraConfig", "HieraForImageClassification", "logits", "pixels", depths=[1, 1, 1, 1])


def siglip_vision() -> Any:
    """SigLIP's vision tower: attention-pooling head over 196 tokens."""
    return _hf("SiglipVisionConfig", "SiglipVisionModel", "pooler_output", "pixels", **HF_WIDTHS, image_size=224, patch_size=16)


def yolos() -> Any:
    """YOLOS: a ViT with 100 detection tokens appended."""
    return _hf("YolosConfig", "YolosModel", "last_hidden_state", "pixels", **HF_WIDTHS, image_size=[224, 224])


def wavlm() -> Any:
    """WavLM: gated relative position bias in every layer."""
    return _hf("WavLMConfig", "WavLMModel", "last_hidden_state", "audio", **HF_WIDTHS, **_AUDIO_FRONT)


def hubert() -> Any:
    """HuBERT: wav2vec2's front end and encoder."""
    return _hf("HubertConfig", "HubertModel", "last_hidden_state", "audio", **HF_WIDTHS, **_AUDIO_FRONT)


def ast() -> Any:
    """Audio Spectrogram Transformer: 16 x 16 patches of 1024 x 128 filterbanks, stride 10."""
    return _hf("ASTConfig", "ASTForAudioClassification", "logits", "audio", **HF_WIDTHS, max_length=1024, num_mel_bins=128)


def speech_to_text() -> Any:
    """Speech2Text's encoder: two stride-2 1-D convolutions with GLU, sinusoidal positions."""
    _seeded()
    from transformers import Speech2TextConfig
    from transformers.models.speech_to_text.modeling_speech_to_text import Speech2TextEncoder

    config = Speech2TextConfig(
        d_model=TEXT["hidden"],
        encoder_layers=TEXT["layers"],
        encoder_attention_heads=TEXT["heads"],
        encoder_ffn_dim=TEXT["ffn"],
        input_feat_per_channel=80,
    )
    config._attn_implementation = "eager"
    return _wrap(Speech2TextEncoder(config), "last_hidden_state", "mel")


# The survey's second probe: operators the first one did not reach (FFT, MoE routing,
# grouped 1-D convolutions, deformable sampling, selective scans, quantizer codebooks).

_HEADS = {"num_hidden_layers": TEXT["layers"], "num_attention_heads": TEXT["heads"]}


def fnet() -> Any:
    """FNet: token mixing by a 2-D Fourier transform (the real part), no attention."""
    return _hf("FNetConfig", "FNetModel", "last_hidden_state", "ids", vocab_size=VOCAB, hidden_size=TEXT["hidden"],
               num_hidden_layers=TEXT["layers"], intermediate_size=TEXT["ffn"])  # fmt: skip


def squeezebert() -> Any:
    """SqueezeBERT: grouped 1-D convolutions in place of the dense projections."""
    return _hf("SqueezeBertConfig", "SqueezeBertModel", "last_hidden_state", "text", vocab_size=VOCAB,
               embedding_size=TEXT["hidden"], **HF_WIDTHS)  # fmt: skip


def convbert() -> Any:
    """ConvBERT: span-based dynamic convolution heads beside self-attention."""
    return _hf("ConvBertConfig", "ConvBertModel", "last_hidden_state", "text", vocab_size=VOCAB,
               embedding_size=TEXT["hidden"], **HF_WIDTHS)  # fmt: skip


def funnel() -> Any:
    """Funnel Transformer (base): the sequence pooled between blocks, relative attention."""
    return _hf("FunnelConfig", "FunnelBaseModel", "last_hidden_state", "text", vocab_size=VOCAB, block_sizes=[1, 1],
               d_model=TEXT["hidden"], n_head=TEXT["heads"], d_head=64, d_inner=TEXT["ffn"])  # fmt: skip


def canine() -> Any:
    """CANINE: hashed character embeddings, a strided 1-D convolution down, local attention."""
    return _hf("CanineConfig", "CanineModel", "last_hidden_state", "text", **HF_WIDTHS)


def esm() -> Any:
    """ESM: rotary positions, token-dropout rescaling of the embeddings."""
    return _hf("EsmConfig", "EsmModel", "last_hidden_state", "text", vocab_size=VOCAB, pad_token_id=1,
               mask_token_id=32, position_embedding_type="rotary", token_dropout=True, **HF_WIDTHS)  # fmt: skip


def mixtral() -> Any:
    """Mixtral: a sparse mixture of 4 experts, 2 per token (top-k routing), GQA 4/2.
    Neither exporter takes transformers 5's expert dispatch (``torch.histc``; dynamo's
    conversion fails): listed so that the probe reports it."""
    return _hf("MixtralConfig", "MixtralForCausalLM", "logits", "text", vocab_size=VOCAB, **HF_WIDTHS,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False,
               **_IDS)  # fmt: skip


def xlnet() -> Any:
    """XLNet: two-stream relative attention with its relative shift."""
    return _hf("XLNetConfig", "XLNetModel", "last_hidden_state", "text", vocab_size=VOCAB, d_model=TEXT["hidden"],
               n_layer=TEXT["layers"], n_head=TEXT["heads"], d_inner=TEXT["ffn"], use_mems_eval=False)  # fmt: skip


def mamba() -> Any:
    """Mamba: causal depthwise 1-D convolution and a selective state-space scan."""
    return _hf("MambaConfig", "MambaModel", "last_hidden_state", "ids", vocab_size=VOCAB, hidden_size=TEXT["hidden"],
               num_hidden_layers=TEXT["layers"], use_cache=False, **_IDS)  # fmt: skip


def nystromformer() -> Any:
    """Nystromformer: attention through 64 landmarks and an iterative pseudo-inverse."""
    return _hf("NystromformerConfig", "NystromformerModel", "last_hidden_state", "text", vocab_size=VOCAB,
               num_landmarks=32, segment_means_seq_len=128, **HF_WIDTHS)  # fmt: skip


def longformer() -> Any:
    """Longformer: sliding-window attention (32 tokens) in overlapping chunks."""
    return _hf("LongformerConfig", "LongformerModel", "last_hidden_state", "text", vocab_size=VOCAB,
               attention_window=32, **HF_WIDTHS)  # fmt: skip


def _resnet_backbone(stages: list[str]) -> Any:
    from transformers import ResNetConfig

    return ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512], out_features=stages)


def detr() -> Any:
    """DETR: a ResNet backbone, sine positions, 100 object queries through a decoder."""
    return _hf("DetrConfig", "DetrForObjectDetection", "logits", "pixels", calibrate=(4, 3, 224, 224),
               use_timm_backbone=False, use_pretrained_backbone=False,
               backbone_config=_resnet_backbone(["stage4"]), d_model=TEXT["hidden"],
               encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=TEXT["ffn"], decoder_ffn_dim=TEXT["ffn"])  # fmt: skip


def deformable_detr() -> Any:
    """Deformable DETR: multi-scale deformable attention (bilinear sampling, GridSample)."""
    return _hf("DeformableDetrConfig", "DeformableDetrForObjectDetection", "logits", "pixels",
               calibrate=(4, 3, 224, 224), use_timm_backbone=False, use_pretrained_backbone=False,
               backbone_config=_resnet_backbone(["stage2", "stage3", "stage4"]), d_model=TEXT["hidden"],
               encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=TEXT["ffn"], decoder_ffn_dim=TEXT["ffn"])  # fmt: skip


def dpt() -> Any:
    """DPT (segmentation head): a ViT's tokens reassembled at four scales, fused upward."""
    return _hf("DPTConfig", "DPTForSemanticSegmentation", "logits", "pixels", calibrate=(4, 3, 224, 224), hidden_size=TEXT["hidden"],
               num_hidden_layers=4, num_attention_heads=TEXT["heads"], intermediate_size=TEXT["ffn"],
               image_size=224, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[32, 64, 128, 256],
               fusion_hidden_size=64)  # fmt: skip


def sam_vision() -> Any:
    """SAM's image encoder: windowed attention with decomposed relative positions, a neck."""
    return _hf("SamVisionConfig", "SamVisionModel", "last_hidden_state", "pixels", hidden_size=TEXT["hidden"],
               **_HEADS, mlp_dim=TEXT["ffn"], image_size=224, window_size=7, global_attn_indexes=[1],
               output_channels=128, initializer_range=0.02)  # fmt: skip


def cvt() -> Any:
    """CvT: convolutional token embeddings and depthwise convolutional projections (a
    stage's depth at least its index + 1: transformers indexes its drop-path rates so)."""
    return _hf("CvtConfig", "CvtForImageClassification", "logits", "pixels", calibrate=(4, 3, 224, 224),
               depth=[1, 2, 3], num_labels=1000)  # fmt: skip


def mobilenet_v1() -> Any:
    """MobileNetV1 (transformers): TensorFlow "same" padding computed from the input size."""
    return _hf("MobileNetV1Config", "MobileNetV1ForImageClassification", "logits", "pixels",
               calibrate=(4, 3, 224, 224), tf_padding=True, num_labels=1000)  # fmt: skip


def swiftformer() -> Any:
    """SwiftFormer: efficient additive attention, convolutional encoders."""
    return _hf("SwiftFormerConfig", "SwiftFormerForImageClassification", "logits", "pixels",
               calibrate=(4, 3, 224, 224), depths=[1, 1, 1, 1], num_labels=1000)  # fmt: skip


def timesformer() -> Any:
    """TimeSformer: divided space-time attention over 8 frames of 224 x 224."""
    return _hf("TimesformerConfig", "TimesformerModel", "last_hidden_state", "pixels", **HF_WIDTHS,
               image_size=224, num_frames=8)  # fmt: skip


def encodec() -> Any:
    """EnCodec: strided 1-D convolutions, LSTMs, a residual vector quantizer, and back."""
    return _hf("EncodecConfig", "EncodecModel", "audio_values", "audio", num_filters=16, hidden_size=64,
               codebook_size=256, target_bandwidths=[1.5, 3.0])  # fmt: skip


def sew_d() -> Any:
    """SEW-D: a squeezed wav2vec2 front end, DeBERTa-style disentangled attention."""
    return _hf("SEWDConfig", "SEWDModel", "last_hidden_state", "audio", **HF_WIDTHS)


def patchtst() -> Any:
    """PatchTST: 7 series of 512 steps cut into patches, batch norms, a linear forecast."""
    return _hf("PatchTSTConfig", "PatchTSTForPrediction", "prediction_outputs", "series", calibrate=(4, 512, 7),
               num_input_channels=7, context_length=512, prediction_length=96, d_model=128,
               num_attention_heads=4, num_hidden_layers=2, ffn_dim=512)  # fmt: skip


# --- The third probe ------------------------------------------------------------------


def gpt_bigcode() -> Any:
    """GPT-BigCode (StarCoder's): multi-query attention from one fused QKV projection."""
    return _hf("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "logits", "text", vocab_size=VOCAB, n_embd=TEXT["hidden"],
               n_layer=TEXT["layers"], n_head=TEXT["heads"], n_inner=TEXT["ffn"], n_positions=TEXT["positions"],
               multi_query=True, use_cache=False, **_IDS)  # fmt: skip


def videomae() -> Any:
    """VideoMAE: 2 x 16 x 16 tubelets (a strided 3-D convolution), fixed sine positions."""
    return _hf("VideoMAEConfig", "VideoMAEModel", "last_hidden_state", "pixels", **HF_WIDTHS, image_size=224,
               num_frames=8, tubelet_size=2)  # fmt: skip


def data2vec_audio() -> Any:
    """Data2Vec audio: wav2vec2's front end with layer norms, five positional convolutions."""
    return _hf("Data2VecAudioConfig", "Data2VecAudioModel", "last_hidden_state", "audio", **HF_WIDTHS,
               conv_dim=(256,) * 7, num_conv_pos_embeddings=5, num_conv_pos_embedding_groups=16)  # fmt: skip


def depth_anything() -> Any:
    """Depth Anything: a DINOv2 backbone's tokens reassembled (DPT) and upsampled to depth."""
    from transformers import Dinov2Config

    backbone = Dinov2Config(hidden_size=TEXT["hidden"], num_hidden_layers=4, num_attention_heads=TEXT["heads"],
                            intermediate_size=TEXT["ffn"], image_size=224, patch_size=14,
                            out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False)
    return _hf("DepthAnythingConfig", "DepthAnythingForDepthEstimation", "predicted_depth", "pixels",
               backbone_config=backbone, neck_hidden_sizes=[32, 64, 128, 256], fusion_hidden_size=64,
               reassemble_hidden_size=TEXT["hidden"], patch_size=14)  # fmt: skip


def glpn() -> Any:
    """GLPN: a Mix Transformer encoder and a decoder of selective feature fusion to depth."""
    return _hf("GLPNConfig", "GLPNForDepthEstimation", "predicted_depth", "pixels", calibrate=(4, 3, 224, 224),
               depths=[1, 1, 1, 1], decoder_hidden_size=32)  # fmt: skip


def upernet() -> Any:
    """UperNet over a ConvNeXt backbone: a pyramid pooling module (adaptive pools to 1, 2,
    3 and 6 of a 7 x 7 map) and an FPN, resized back and fused."""
    from transformers import ConvNextConfig

    backbone = ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    return _hf("UperNetConfig", "UperNetForSemanticSegmentation", "logits", "pixels", calibrate=(4, 3, 224, 224),
               backbone_config=backbone, hidden_size=64, auxiliary_in_channels=128, use_auxiliary_head=False,
               num_labels=21)  # fmt: skip


def swin2sr() -> Any:
    """Swin2SR (x2 super-resolution): window attention over 64 x 64 patches, a pixel
    shuffle up."""
    return _hf("Swin2SRConfig", "Swin2SRForImageSuperResolution", "reconstruction", "pixels", image_size=64,
               embed_dim=60, depths=[2, 2], num_heads=[6, 6], window_size=8, upscale=2,
               upsampler="pixelshuffle")  # fmt: skip


def hifigan() -> Any:
    """SpeechT5's HiFi-GAN vocoder: a mel spectrogram to a waveform through transposed
    1-D convolutions and dilated residual blocks."""
    return _hf("SpeechT5HifiGanConfig", "SpeechT5HifiGan", None, "spectrogram", upsample_initial_channel=128)


def dac() -> Any:
    """Descript's audio codec: snake activations, strided 1-D convolutions, a residual
    vector quantizer with projections, transposed convolutions back."""
    return _hf("DacConfig", "DacModel", "audio_values", "audio", encoder_hidden_size=16, decoder_hidden_size=128,
               downsampling_ratios=[2, 4, 5, 8], upsampling_ratios=[8, 5, 4, 2], hidden_size=64, n_codebooks=4,
               codebook_size=256)  # fmt: skip


def mimi() -> Any:
    """Mimi (Moshi's codec): EnCodec-like convolutions around a transformer with rotary
    attention, split residual quantizers."""
    return _hf("MimiConfig", "MimiModel", "audio_values", "audio", hidden_size=128, num_filters=16,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
               intermediate_size=512, codebook_size=256, num_quantizers=4, sliding_window=64, upsample_groups=128,
               vector_quantization_hidden_dimension=128, codebook_dim=128)  # fmt: skip


def recurrent_gemma() -> Any:
    """RecurrentGemma (Griffin): RG-LRU recurrences (unrolled over the 128 tokens) beside
    local attention."""
    return _hf("RecurrentGemmaConfig", "RecurrentGemmaForCausalLM", "logits", "text", vocab_size=VOCAB,
               hidden_size=TEXT["hidden"], intermediate_size=TEXT["ffn"], num_hidden_layers=3,
               num_attention_heads=TEXT["heads"], num_key_value_heads=1, lru_width=TEXT["hidden"],
               attention_window_size=64, **_IDS)  # fmt: skip


def rt_detr() -> Any:
    """RT-DETR: a hybrid encoder (attention on the coarsest map, a CNN fusion across
    scales), top-k query selection, deformable-attention decoder."""
    from transformers import RTDetrResNetConfig

    backbone = RTDetrResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
                                  out_features=["stage2", "stage3", "stage4"])
    return _hf("RTDetrConfig", "RTDetrForObjectDetection", "logits", "pixels", calibrate=(4, 3, 224, 224),
               backbone_config=backbone, encoder_in_channels=[128, 256, 512], d_model=TEXT["hidden"],
               encoder_hidden_dim=TEXT["hidden"], decoder_layers=2, num_queries=100,
               use_pretrained_backbone=False)  # fmt: skip


# --- The fourth probe (thirty-seventh session: bilinear sampling, GridSample) ----------


def raft_small() -> Any:
    """torchvision's RAFT (small): optical flow between two frames, a correlation pyramid
    looked up by ``grid_sample`` at every refinement (4 here), a convolutional GRU."""
    _seeded()
    import torchvision

    return _wrap(torchvision.models.optical_flow.raft_small(weights=None), None, "frames", num_flow_updates=4)


def mask2former() -> Any:
    """Mask2Former: a Swin backbone, a multi-scale deformable-attention pixel decoder
    (``grid_sample``), masked attention over 50 queries."""
    from transformers import SwinConfig

    backbone = SwinConfig(image_size=224, embed_dim=48, depths=[1, 1, 1, 1], num_heads=[2, 2, 4, 4],
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    return _hf("Mask2FormerConfig", "Mask2FormerForUniversalSegmentation", "masks_queries_logits", "pixels",
               backbone_config=backbone, hidden_dim=128, encoder_layers=2, decoder_layers=3, num_queries=50,
               encoder_feedforward_dim=256, dim_feedforward=256, mask_feature_size=128, feature_size=128,
               num_attention_heads=4)  # fmt: skip
