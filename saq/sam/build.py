"""Model registry: builds SAM ViT-B/L/H and our small SAM from segment_anything's classes, and validates checkpoints."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from saq.errors import SaqError

TINY_DIR = Path(__file__).parent / "tiny"
TINY_CHECKPOINT = TINY_DIR / "sam_tiny.pt"


@dataclass(frozen=True)
class SamArchitecture:
    """Every size-defining number of a SAM; the real models and sam_tiny differ only in these."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_depth: int = 2
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: tuple[float, ...] = field(default=(123.675, 116.28, 103.53))
    pixel_std: tuple[float, ...] = field(default=(58.395, 57.12, 57.375))

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


# The three official sizes (paper.md §1) and ours. sam_tiny keeps the real encoders' shape in small: windowed
# blocks closed by global-attention blocks (two stages), relative-position bias, the neck, a depth-2 two-way decoder.
ARCHITECTURES: dict[str, SamArchitecture] = {
    "sam_vit_b": SamArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": SamArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": SamArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    "sam_tiny": SamArchitecture(
        encoder_embed_dim=128,
        encoder_depth=6,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(2, 5),
        image_size=256,
        patch_size=8,  # a 32x32 token grid: with 16-px patches masks stayed blobby (val mIoU 0.71 against 0.81)
        window_size=8,  # 64 px windows
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        decoder_num_heads=8,
        iou_head_hidden_dim=128,
    ),
}

# Models built from another's architecture and weights, changed at load time (saq/sam/outliers.py).
VARIANTS = {"sam_tiny_outliers": "sam_tiny"}

# Which official model an encoder width belongs to, to name the size of a mismatched checkpoint.
_SIZE_BY_WIDTH = {a.encoder_embed_dim: name for name, a in ARCHITECTURES.items()}


def make_sam(arch: SamArchitecture) -> Sam:
    """A randomly initialised SAM of the given architecture, from segment_anything's own classes."""
    emb = arch.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=arch.encoder_global_attn_indexes,
            window_size=arch.window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=list(arch.pixel_mean),
        pixel_std=list(arch.pixel_std),
    )
    return sam.eval()


def read_state_dict(path: Path, config_key: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint file as a state dict, or raise SaqError saying what is wrong with it. mmap: tensors mapped
    from the file, not read (shapes and dtypes only cost the file's index); a file of torch's legacy format, which
    cannot be mapped, is read whole."""
    if not path.is_file():
        raise _not_found(path, config_key)
    if not mmap:  # a mapped read looks at the index only; the run that loads the values checks them
        from saq.torchfile import damaged_record

        damaged = damaged_record(path)
        if damaged is not None:
            raise SaqError(f"checkpoint {path} is damaged: its record {damaged} does not match the checksum the "
                           "file stores (a broken copy or download); copy it again from its source")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "zipfile" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # readable, but it holds Python objects beside the tensors (training metadata)
        try:
            objects = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint at all: a corrupt or foreign file
            objects = []
        if not objects:
            raise SaqError(f"checkpoint {path} is not a readable PyTorch file; {config_key} must point to a SAM "
                           "state dict (.pth)") from None
        # a whole pickled model (torch.save(sam)) has no key to index: its state_dict() is the weights
        whole = any(o.startswith(("segment_anything.modeling", "torch.nn.modules")) for o in objects)
        resave = ("torch.save(torch.load(PATH, weights_only=False).state_dict(), 'sam.pth')" if whole else
                  "torch.save(torch.load(PATH, weights_only=False)['model'], 'sam.pth'), with the key that holds them")
        raise SaqError(f"checkpoint {path} holds Python objects beside its tensors ({', '.join(objects[:3])}"
                       f"{', ...' if len(objects) > 3 else ''}), which saq does not unpickle (that could run code); "
                       f"re-save its weights alone: {resave}") from None
    except Exception as exc:  # torch raises many types for corrupt files; all mean the same to the user
        raise SaqError(f"checkpoint {path} is not a readable PyTorch file ({type(exc).__name__}); "
                       f"{config_key} must point to a SAM state dict (.pth)") from None
    # training scripts wrap the weights ({"model": ...}, {"state_dict": ...}, {"model_state_dict": ...}, nested
    # twice at most) and DDP prefixes every key "module."
    for _ in range(2):
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()) or any(
                _sam_part_at(k) >= 0 for k in obj):  # SAM's own keys here: no wrapper to open
            break
        # "model" may be a config dict beside the weights: a key is opened only when it holds SAM, and only when
        # it is the one that does (the model's and an EMA's weights: which one to evaluate is the user's choice)
        holding = [k for k, v in obj.items() if isinstance(v, dict) and _holds_sam(v)]
        if len(holding) == 1:
            obj = obj[holding[0]]
        else:
            keys = ", ".join(map(str, list(obj)[:6])) + (", ..." if len(obj) > 6 else "")
            if holding:  # a model and its EMA, say: which to evaluate is the user's choice
                resave = " or ".join(f"torch.save(torch.load(PATH)[{k!r}], 'sam.pth')" for k in holding[:3])
                raise SaqError(f"checkpoint {path} holds {keys} (SAM's weights under each of "
                               f"{', '.join(map(str, holding))}); re-save the ones to evaluate alone: {resave}")
            raise SaqError(f"checkpoint {path} holds {keys} (no SAM weights found); re-save the weights alone: "
                           "torch.save(torch.load(PATH)[KEY], 'sam.pth') with the key that holds them")
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        odd = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None) if isinstance(obj, dict) \
            else None
        found = (f"{odd!r} is {type(obj[odd]).__name__}, not a tensor" if odd is not None
                 else f"found {type(obj).__name__}")
        raise SaqError(f"checkpoint {path} is not a state dict of tensors ({found}); {config_key} must point to a "
                       "SAM state dict (.pth)")
    return _strip_prefix(obj)


def _holds_sam(tree: dict) -> bool:
    """Whether a dict holds SAM's tensors, directly or one wrapper further down (keys named after SAM's parameters
    with other values, such as per-layer learning rates, are no weights)."""
    return any((_sam_part_at(k) >= 0 and isinstance(v, torch.Tensor)) or (isinstance(v, dict) and _holds_sam(v))
               for k, v in tree.items())


SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _sam_part_at(key) -> int:
    """Where SAM's own part of a state-dict key starts (after a wrapper's prefix), or -1 when it has none."""
    return min((i for i in (str(key).find(part) for part in SAM_PARTS) if i >= 0), default=-1)


def _strip_prefix(state: dict) -> dict:
    """SAM's keys under one common prefix (DDP's "module.", a wrapper's "model." or "sam.") lose it; other tensors
    (an EMA's n_averaged) keep their names, for check_state_dict to name."""
    prefixes = {str(key)[:_sam_part_at(key)] for key in state if _sam_part_at(key) >= 0}
    if len(prefixes) != 1 or prefixes == {""}:
        return state
    (prefix,) = prefixes
    return {k[len(prefix):] if _sam_part_at(k) == len(prefix) else k: v for k, v in state.items()}


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str, path: Path,
                     values: bool = True) -> None:
    """Raise SaqError naming the first mismatching tensor when `state` was not saved from a `name` model; values:
    also that every weight is finite (reads the tensors)."""
    expected = model.state_dict()
    if any("_quantizer." in str(k) for k in state):
        raise SaqError(f"checkpoint {path} is a saq quantized model (quantizer tensors), not SAM's FP weights: "
                       "evaluate it with quant.load=RUN_DIR and model.checkpoint= the checkpoint it was made from")
    if not set(state) & set(expected):
        raise SaqError(f"checkpoint {path} is not a SAM checkpoint: none of its {len(state)} tensors is one of "
                       f"{name}'s (e.g. {sorted(state, key=str)[0]})")
    width = state.get("image_encoder.pos_embed")
    found_size = _SIZE_BY_WIDTH.get(int(width.shape[-1])) if width is not None and width.ndim == 4 else None
    hint = f" It looks like a {found_size} checkpoint." if found_size and found_size != name else ""
    for key, tensor in expected.items():
        if key not in state:
            raise SaqError(f"checkpoint {path} does not fit {name}: tensor {key} is missing.{hint}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise SaqError(f"checkpoint {path} does not fit {name}: {key} expected shape {tuple(tensor.shape)}, "
                           f"found {tuple(state[key].shape)}.{hint}")
        # loading casts silently: integer weights would load as whatever they were rounded to
        if tensor.is_floating_point() and not state[key].is_floating_point():
            raise SaqError(f"checkpoint {path}: tensor {key} is {str(state[key].dtype).removeprefix('torch.')}, "
                           "not floating point; SAM's weights are float32 (or float16/bfloat16)")
        if values and tensor.is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            bad = int((~torch.isfinite(state[key])).sum())
            raise SaqError(f"checkpoint {path}: tensor {key} holds {bad} NaN or infinite value"
                           f"{'s' if bad > 1 else ''}; the weights are damaged (re-export them from training)")
    extra = sorted(set(state) - set(expected), key=str)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        outside = [k for k in extra if not str(k).startswith(SAM_PARTS)]
        # tensors beside SAM's (an EMA's counter, a saved pixel_mean) can go; ones inside SAM's modules (adapters,
        # extra tokens) make another model, which SAM's weights alone would not be
        fix = (" Every SAM tensor is there: re-save SAM's weights alone, {k: v for k, v in sd.items() if "
               "k.startswith(('image_encoder.', 'prompt_encoder.', 'mask_decoder.'))}." if len(outside) == len(extra)
               else "")
        raise SaqError(f"checkpoint {path} does not fit {name}: unexpected tensor {extra[0]}{more}.{hint}{fix}")


def build_sam(name: str, checkpoint: str | Path | None = None, config_key: str = "model.checkpoint") -> Sam:
    """Build model `name` in eval mode and load its checkpoint (sam_tiny defaults to the one shipped in the repo).

    checkpoint=None is allowed for the official sizes only when explicitly asked for random weights through
    build_random_sam; here a missing path is an error, because a run on random weights is a silent wrong result.
    """
    name = VARIANTS.get(name, name)
    path = checkpoint_file(name, checkpoint, config_key)
    state = read_state_dict(path, config_key)
    model = make_sam(ARCHITECTURES[name])
    check_state_dict(model, state, name, path)
    model.load_state_dict(state)
    return model.eval()


def check_checkpoint_fits(name: str, checkpoint, config_key: str = "model.checkpoint") -> None:
    """SaqError unless model `name`'s checkpoint file holds its tensors in their shapes and dtypes, read from the
    file's index (tensor data untouched, the model built on the meta device): what a sweep asks of every job's file
    before the first job starts; the job itself also checks the values."""
    name = VARIANTS.get(name, name)
    path = checkpoint_file(name, checkpoint, config_key)
    state = read_state_dict(path, config_key, mmap=True)
    with torch.device("meta"):
        model = make_sam(ARCHITECTURES[name])
    check_state_dict(model, state, name, path, values=False)


def checkpoint_file(name: str, checkpoint, config_key: str = "model.checkpoint", must_exist: bool = True) -> Path:
    """The existing file model `name` loads for a model.checkpoint value; else a SaqError (an unknown model, no
    checkpoint given for an official size, a path that is no file). A run asks this before anything is computed, a
    sweep of every job before the first (must_exist=False: jobs on other machines, whose files this one may lack)."""
    name = VARIANTS.get(name, name)
    if name not in ARCHITECTURES:
        raise SaqError(f"unknown model {name!r}; expected one of {sorted(ARCHITECTURES) + sorted(VARIANTS)}")
    path = checkpoint_path(name, checkpoint)
    if path is None:
        raise SaqError(f"model {name} needs a checkpoint: set {config_key}=/path/to/{name}.pth")
    if must_exist and not path.is_file():
        raise _not_found(path, config_key)
    return path


def _not_found(path: Path, config_key: str) -> SaqError:
    """The line for a checkpoint path that is no file (read_state_dict and checkpoint_file say the same)."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt*"))[:3]
        return SaqError(f"checkpoint {path} is a folder; set {config_key} to the SAM .pth file"
                        + (f" in it ({', '.join(inside)})" if inside else ""))
    return SaqError(f"checkpoint not found: {path} (set {config_key} to the path of a SAM .pth file)")


def checkpoint_path(name: str, checkpoint) -> Path | None:
    """The file a model.checkpoint value names, ~ expanded; None or "" is sam_tiny's shipped one (and None, no file,
    for the other sizes)."""
    if checkpoint in (None, ""):
        return TINY_CHECKPOINT if VARIANTS.get(name, name) == "sam_tiny" else None
    return Path(checkpoint).expanduser()


def checkpoint_digest(name: str, checkpoint) -> str | None:
    """SHA-256 of the checkpoint file a model.checkpoint value loads (None without a file): what a saved quantized
    model was made from, whatever its path or modification time (a retrained file at the same path differs)."""
    path = checkpoint_path(name, checkpoint)
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    seen = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if seen not in _DIGESTS:  # a saving run asks twice (results.json, the saved recipe); ViT-H is 2.5 GB
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        _DIGESTS[seen] = digest.hexdigest()
    return _DIGESTS[seen]


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> SHA-256: a file rewritten since is hashed again


def build_random_sam(name: str, seed: int = 0) -> Sam:
    """A seeded, randomly initialised model of a registered size (for tests and benchmarks, never for results)."""
    if name not in ARCHITECTURES:
        raise SaqError(f"unknown model {name!r}; expected one of {sorted(ARCHITECTURES)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make_sam(ARCHITECTURES[name])
