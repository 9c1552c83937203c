"""The typed STARFlow-V config: :class:`ModelConfig`, frozen, with derived sizes and validation.

:func:`load_config` / :func:`parse_config` build it from upstream's YAML (read by
:mod:`starflow_trt.upstream_yaml`, spec §1.1-§1.3): a key absent from the file takes upstream's default
(the field defaults here; :attr:`ModelConfig.absent` records which, :func:`applied_defaults` lists them),
unknown keys are kept (:attr:`ModelConfig.unknown`). ``txt_dim`` is not an upstream key: it is the text
encoder's hidden size (:meth:`ModelConfig.with_text_width`). Frame sizes per aspect ratio are
:mod:`starflow_trt.geometry`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .model_constants import VAE_SPATIAL_FACTOR, VAE_TEMPORAL_FACTOR
from .upstream_yaml import TRAINING_KEYS, YAML_KEY, read_arguments, write_arguments, yaml_key

#: Hidden sizes of text encoders the configs name (``text`` field) → ``txt_dim``.
TEXT_ENCODER_WIDTHS = {
    "google/flan-t5-xl": 2048,
    "google/flan-t5-large": 1024,
    "google/flan-t5-base": 768,
    "google/t5-v1_1-xxl": 4096,
    "google/flan-t5-xxl": 4096,
}


@dataclass(frozen=True)
class ModelConfig:
    """Every field the spec names (§1.2), with the upstream parser's defaults.

    Field names are the YAML keys. Derived geometry is exposed as properties
    and methods; nothing here allocates tensors.
    """

    # --- model constructor fields (spec §1.2) ---
    channel_size: int = 3
    img_size: int = 32
    patch_size: int = 4
    channels: int = 512
    top_block_channels: Optional[int] = None
    blocks: int = 4
    layers_per_block: tuple[int, ...] = (8,)
    rope: int = 0
    pt_seq_len: Optional[int] = None
    head_dim: int = 64
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    use_swiglu: int = 0
    use_qk_norm: int = 0
    use_post_norm: int = 0
    use_bias: int = 1
    norm_type: str = "layer_norm"
    txt_size: int = 0
    txt_dim: Optional[int] = None
    sos: int = 0
    cond_top_only: int = 0
    use_softplus: int = 0
    use_final_norm: int = 0
    soft_clip: float = 0.0
    seq_order: str = "R2L"
    learnable_self_denoiser: int = 0
    conditional_denoiser: int = 0
    noise_embed_denoiser: int = 0
    temporal_causal: int = 0
    shallow_block_local: int = 0
    denoiser_window: Optional[int] = None
    local_attn_window: Optional[int] = None
    use_pretrained_lm: Optional[str] = None
    use_mm_attn: int = 0
    gradient_checkpoint: int = 0
    gradient_checkpoint_mlp: Optional[int] = None
    # --- parsed, used by the sampling pipeline, not by the model (spec §1.2) ---
    nvp: int = 1
    adaln: int = 0
    noise_std: float = 0.5
    vid_size: Optional[str] = None
    fps_cond: int = 0
    cond_noise_level: int = 0
    mix_aspect: int = 0
    vae: Optional[str] = None
    finetuned_vae: Optional[str] = None
    text: Optional[str] = None
    #: classifier-free guidance values the config was trained / sampled with (upstream key ``cfg``)
    guidance_values: tuple[float, ...] = field(default=(), metadata={YAML_KEY: "cfg"})
    drop_label: float = 0.0
    drop_image: float = 0.0
    # --- keys we do not know (training-only ones included): kept verbatim, never fatal ---
    unknown: tuple[tuple[str, str], ...] = field(default=(), compare=True)
    # --- provenance, not model fields (never compared, stored or hashed) ---
    #: fields absent from the parsed YAML: they hold upstream's defaults (spec §1.2)
    absent: tuple[str, ...] = field(default=(), compare=False)
    #: where a ``txt_dim`` absent from the YAML came from (see :meth:`with_text_width`)
    txt_dim_source: Optional[str] = field(default=None, compare=False)

    # ------------------------------------------------------------------ derived
    @property
    def num_blocks(self) -> int:
        """``blocks`` if ``layers_per_block`` has one entry, else its length."""
        return self.blocks if len(self.layers_per_block) == 1 else len(self.layers_per_block)

    @property
    def layers(self) -> tuple[int, ...]:
        """Transformer layers of every flow block, block 0 first (top block last)."""
        if len(self.layers_per_block) == 1:
            return self.layers_per_block * self.num_blocks
        return self.layers_per_block

    @property
    def top_index(self) -> int:
        return self.num_blocks - 1

    @property
    def top_channels(self) -> int:
        return self.top_block_channels or self.channels

    def block_width(self, k: int) -> int:
        """Residual width of flow block ``k``."""
        return self.top_channels if k == self.top_index else self.channels

    def block_heads(self, k: int) -> int:
        """Attention heads of flow block ``k`` (``num_heads`` applies to every block when set)."""
        return self.num_heads or self.block_width(k) // self.head_dim

    @property
    def denoiser_heads(self) -> int:
        return self.num_heads or self.channels // self.head_dim

    def block_has_text(self, k: int) -> bool:
        """Whether block ``k`` is text-conditioned (top only with ``cond_top_only``)."""
        if self.txt_size <= 0:
            return False
        return k == self.top_index or not self.cond_top_only

    def block_permutation(self, k: int) -> str:
        """``identity`` | ``flip`` | ``flip_within_frame`` for block ``k`` (spec §3.3)."""
        kinds = ("identity", "flip" if self.temporal_causal == 0 else "flip_within_frame")
        if self.seq_order == "L2R":
            return kinds[(k + 1) % 2]
        return kinds[k % 2]

    @property
    def vae_spatial_factor(self) -> int:
        return VAE_SPATIAL_FACTOR if self.vae else 1

    @property
    def vae_temporal_scale(self) -> Optional[float]:
        """The ``:0.6`` suffix of the ``vae`` field (latent frames 1: are scaled by it)."""
        if self.vae and ":" in self.vae:
            return float(self.vae.rsplit(":", 1)[1])
        return None

    @property
    def latent_img_size(self) -> int:
        """``img_size`` in latent units (divided by the VAE's spatial factor when a VAE is set)."""
        return self.img_size // self.vae_spatial_factor

    @property
    def rope_seq_len(self) -> int:
        """``pt_seq_len`` (P in the spec), defaulting to ``latent_img_size // patch_size``."""
        return self.pt_seq_len if self.pt_seq_len is not None else self.latent_img_size // self.patch_size

    @property
    def token_channels(self) -> int:
        """``c = channel_size · patch_size²``: channels of one token."""
        return self.channel_size * self.patch_size ** 2

    @property
    def text_length(self) -> int:
        return self.txt_size

    @property
    def text_width(self) -> Optional[int]:
        """``txt_dim``: explicit (or resolved, :meth:`with_text_width`), else the named text encoder's
        width, else None."""
        if self.txt_dim is not None:
            return self.txt_dim
        if self.text is not None:
            return TEXT_ENCODER_WIDTHS.get(self.text)
        return None

    @property
    def text_width_source(self) -> Optional[str]:
        """Where :attr:`text_width` comes from, in words (None when it is unknown)."""
        if self.txt_dim is not None:
            return self.txt_dim_source or "the config"
        if self.text_width is not None:
            return f"the width of text encoder {self.text}"
        return None

    def with_text_width(self, width: int, source: str) -> "ModelConfig":
        """This config with ``txt_dim = width`` from ``source`` (words), unless the YAML states ``txt_dim``.

        Upstream takes ``txt_dim`` from the text encoder it loads; callers resolve it in the order
        ``--text-encoder`` directory, checkpoint's text projection, named encoder (the fallback of
        :attr:`text_width`)."""
        if self.txt_dim is not None:
            return self
        return dataclasses.replace(self, txt_dim=int(width), txt_dim_source=source)

    @property
    def training_keys(self) -> tuple[str, ...]:
        """Keys of the YAML that only upstream's training uses (accepted and ignored)."""
        return tuple(k for k, _ in self.unknown if k in TRAINING_KEYS)

    @property
    def unknown_keys(self) -> tuple[str, ...]:
        """Keys of the YAML that are neither fields nor known training-only options (kept verbatim)."""
        return tuple(k for k, _ in self.unknown if k not in TRAINING_KEYS)

    @property
    def video_frames(self) -> Optional[int]:
        """Pixel frame count from ``vid_size = "frames:fps"`` (None for image configs)."""
        if not self.vid_size:
            return None
        return int(str(self.vid_size).split(":")[0])

    @property
    def fps(self) -> Optional[int]:
        if not self.vid_size or ":" not in str(self.vid_size):
            return None
        return int(str(self.vid_size).split(":")[1])

    @staticmethod
    def latent_frames_for(num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames: ``(F − 1) // 4 + 1`` (spec §1.3)."""
        if num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {num_frames}")
        return (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1

    @property
    def latent_frames(self) -> int:
        """Latent frames of the configured ``vid_size`` (1 for image configs)."""
        frames = self.video_frames
        return 1 if frames is None else self.latent_frames_for(frames)

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming every bad field: sizes, ranges, and the combinations
        upstream asserts against (spec §1.2). Sizes are checked first: derived geometry (widths,
        heads, FLOPs) is meaningless for a config that fails them."""
        if self.vae is not None and self.vid_size is None:
            raise ConfigError(f"image models are not supported: this config has no vid_size and names the image VAE "
                              f"{self.vae}; starflow-trt deploys STARFlow-V video configs (vid_size and the Wan2.2 VAE)")
        sizes = _size_problems(self)
        if sizes:
            raise ConfigError("invalid config: " + "; ".join(sizes) + "; fix these fields in the YAML")
        problems = []
        if self.local_attn_window is not None and not self.shallow_block_local:
            problems.append("local_attn_window requires shallow_block_local: 1")
        if self.shallow_block_local and not self.cond_top_only:
            problems.append("shallow_block_local requires cond_top_only: 1")
        if self.cond_top_only and self.txt_size <= 0:
            problems.append("cond_top_only requires txt_size > 0")
        if self.temporal_causal and self.seq_order != "L2R":
            problems.append("temporal_causal != 0 requires seq_order: L2R" + self._default_note("seq_order"))
        if self.seq_order not in ("L2R", "R2L"):
            problems.append(f"seq_order must be L2R or R2L, got {self.seq_order!r}")
        if self.rope and (self.head_dim % 4 or self.head_dim < 16):
            problems.append(f"rope needs head_dim divisible by 4 and >= 16, got {self.head_dim}")
        for k in range(self.num_blocks):
            if self.num_heads is None and self.block_width(k) % self.head_dim:
                problems.append(f"block {k} width {self.block_width(k)} is not a multiple of head_dim {self.head_dim}"
                                + self._default_note("head_dim"))
                break
        if len(self.layers_per_block) not in (1, self.num_blocks):
            problems.append("layers_per_block must have 1 or num_blocks entries")
        if self.norm_type != "layer_norm":
            problems.append(f"norm_type {self.norm_type!r} is not supported (STARFlow-V uses layer_norm)")
        for flag in ("use_swiglu", "use_qk_norm", "use_post_norm"):
            if getattr(self, flag):
                problems.append(f"{flag}: 1 is not supported (not used by STARFlow-V)")
        if self.num_kv_heads is not None and self.num_kv_heads != self.block_heads(self.top_index):
            problems.append("num_kv_heads (grouped-query attention) is not supported")
        if not self.rope:
            problems.append(self._unsupported("rope", "learned positional embeddings", "rope: 1"))
        if not self.sos:
            problems.append(self._unsupported("sos", "no start-of-sequence token", "sos: 1"))
        if self.use_pretrained_lm:
            problems.append("use_pretrained_lm (LLM-initialised top block) is not supported")
        if self.num_heads is None and any(self.block_heads(k) < 1 for k in range(self.num_blocks)):
            problems.append(f"head_dim {self.head_dim} is larger than a block width "
                            f"({min(self.block_width(k) for k in range(self.num_blocks))})")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))

    def _default_note(self, name: str) -> str:
        """" (absent from the YAML: upstream's default X)" for a field the YAML does not state, else ""."""
        if name not in self.absent:
            return ""
        return f" ({name} is absent from the YAML: upstream's default {getattr(self, name)} applies)"

    def _unsupported(self, name: str, what: str, fix: str) -> str:
        """One problem for a value of ``name`` the toolchain refuses, saying when it is upstream's default."""
        value = getattr(self, name)
        if name in self.absent:
            return (f"{name} is absent from the YAML: upstream's default {value} ({what}) is not supported here; "
                    f"add '- {fix}'")
        return f"{name}: {value} ({what}) is not supported; STARFlow-V uses {fix}"

    # ----------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the parsed fields (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.compare:   # provenance (absent, txt_dim_source): not part of the model
                continue
            v = getattr(self, f.name)
            out[yaml_key(f)] = [list(x) for x in v] if f.name == "unknown" else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        kwargs = {}
        names = {yaml_key(f): f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in names:
                raise ConfigError(f"unknown config field {key!r} in stored config")
            if key == "unknown":
                value = tuple(tuple(x) for x in value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[names[key]] = value
        return cls(**kwargs)

    def hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`to_dict` (stable across runs)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_yaml(self) -> str:
        """Upstream ``arguments:`` YAML for every non-default field (round-trips via :func:`parse_config`)."""
        defaults = ModelConfig()
        stated = []
        for f in fields(self):
            if f.name == "unknown" or not f.compare:
                continue
            v = getattr(self, f.name)
            if (v == getattr(defaults, f.name) or v is None) and f.name not in STATED_KEYS:
                continue
            stated.append((yaml_key(f), v))
        return write_arguments([*stated, *self.unknown])

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _size_problems(cfg: "ModelConfig") -> list[str]:
    """Non-positive sizes, out-of-range flags, unparsable derived fields: one message per field."""
    problems = []

    def need(name: str, ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"{name} must be {what}, got {getattr(cfg, name)!r}")

    for name in ("channel_size", "img_size", "patch_size", "channels", "head_dim", "blocks"):
        need(name, isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 1, "an integer >= 1")
    for name in ("top_block_channels", "num_heads", "num_kv_heads", "txt_dim", "pt_seq_len", "denoiser_window",
                 "local_attn_window"):
        value = getattr(cfg, name)
        need(name, value is None or (isinstance(value, int) and value >= 1), "an integer >= 1 (or None)")
    need("txt_size", isinstance(cfg.txt_size, int) and cfg.txt_size >= 0, "an integer >= 0")
    need("temporal_causal", isinstance(cfg.temporal_causal, int) and cfg.temporal_causal >= 0, "an integer >= 0")
    for name in ("use_bias", "sos", "rope", "cond_top_only", "use_softplus", "use_final_norm",
                 "learnable_self_denoiser", "conditional_denoiser", "shallow_block_local"):
        need(name, getattr(cfg, name) in (0, 1), "0 or 1")
    layers = cfg.layers_per_block
    if not layers or any(not isinstance(n, int) or n < 0 for n in layers):
        problems.append(f"layers_per_block must be integers >= 0, got {' '.join(map(str, layers)) or 'nothing'!r}")
    elif len(layers) in (1, cfg.num_blocks) and cfg.layers[-1] < 1:
        problems.append("layers_per_block: the top (last) block needs at least 1 layer")
    for name in ("soft_clip", "noise_std"):
        value = getattr(cfg, name)
        need(name, isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, "a finite number >= 0")
    if isinstance(cfg.patch_size, int) and isinstance(cfg.img_size, int) and cfg.patch_size >= 1 and cfg.img_size >= 1:
        if cfg.latent_img_size < cfg.patch_size or cfg.latent_img_size % cfg.patch_size:
            problems.append(f"img_size {cfg.img_size} (latent {cfg.latent_img_size}) must be a positive multiple "
                            f"of patch_size {cfg.patch_size}")
    if cfg.vid_size is not None:
        try:
            frames = cfg.video_frames
            fps = cfg.fps
            ok = frames is not None and frames >= 1 and (fps is None or fps >= 1)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"vid_size must look like 'frames:fps' with frames >= 1, got {cfg.vid_size!r}")
    if cfg.vae is not None:
        try:
            scale = cfg.vae_temporal_scale
            ok = scale is None or (math.isfinite(scale) and scale > 0)
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"vae must be 'name' or 'name:scale' with a positive scale, got {cfg.vae!r}")
    return problems


#: fields :meth:`ModelConfig.to_yaml` writes even at their default (a reader sees the attention layout)
STATED_KEYS = ("channels", "head_dim", "rope", "sos")

#: fields never listed as applied defaults: provenance, txt_dim (resolved apart), training-only switches
_NOT_DEFAULTS = ("unknown", "absent", "txt_dim_source", "txt_dim", "drop_label", "drop_image",
                 "gradient_checkpoint", "gradient_checkpoint_mlp")


def applied_defaults(cfg: ModelConfig) -> list[str]:
    """``"name value"`` for every field absent from the YAML that holds a value (upstream's default; a None
    default means "derived" and is not listed), then how ``txt_dim`` was resolved when the YAML lacks it."""
    out = []
    for f in fields(cfg):
        if f.name in _NOT_DEFAULTS or f.name not in cfg.absent:
            continue
        v = getattr(cfg, f.name)
        if v is None or v == ():
            continue
        out.append(f"{yaml_key(f)} {' '.join(map(str, v)) if isinstance(v, tuple) else v}")
    if "txt_dim" in cfg.absent and cfg.txt_size > 0:
        width = cfg.text_width
        out.append(f"txt_dim {width} (from {cfg.text_width_source})" if width is not None
                   else "txt_dim unknown (no text encoder width known; pass a checkpoint or --text-encoder)")
    return out


def parse_config(data: Mapping[str, Any] | str) -> ModelConfig:
    """Parse upstream YAML text (or its loaded mapping) into a validated :class:`ModelConfig`."""
    args = read_arguments(data, [f for f in fields(ModelConfig) if f.name != "unknown" and f.compare])
    cfg = ModelConfig(**args.values, unknown=args.unknown, absent=args.absent)
    cfg.validate()
    return cfg


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read and parse an upstream YAML config file."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config {os.fspath(path)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {os.fspath(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "pass the upstream YAML file") from exc
    return parse_config(text)
