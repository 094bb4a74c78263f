"""config.lora -> the layers a LoRA run adapts, and the adapters' exports.

Targets follow PEFT's `target_modules` rule on the module names diffusers and transformers use
(the same names the LoRA files of ldm_jax/checkpoints/lora carry): an entry selects every module
whose path equals it or ends with "." + entry, so "to_q" is every attention query projection and
"mid_block.attentions.0.proj_in" one layer. `unet_targets` selects in the UNet,
`text_encoder_targets` in every CLIP text encoder of the model (SDXL: both). Every entry must
select something.
"""

from __future__ import annotations

from pathlib import Path

from ldm_jax.checkpoints.lora.write import adapter_modules
from ldm_jax.spec import ModelSpec
from ldm_jax.training.config_checks import ConfigError, check_lora
from ldm_jax.training.lora_adapters import LoRATraining

EXPORT_DIR = "lora"  # <workdir>/lora/<format>.safetensors


def _matches(module: str, entry: str) -> bool:
    return module == entry or module.endswith("." + entry)


def _modules(spec: ModelSpec) -> dict[str, list[tuple[str, tuple[str, ...]]]]:
    """{"unet" | "text": [(module name, (network, *kernel path))]}: each layer once, under its
    diffusers / transformers name (the one the exports write)."""
    grouped: dict[str, list] = {"unet": [], "text": []}
    for layer, target in adapter_modules(spec).items():
        grouped["unet" if target.component == "unet" else "text"].append((target.module, layer))
    return grouped


def _endings(modules) -> list[str]:
    """The distinct last names of `modules` (with their parent for numbered ones: to_out.0)."""
    endings = set()
    for module, _ in modules:
        parts = module.split(".")
        endings.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(endings)


def lora_from_config(lora_cfg, spec: ModelSpec) -> LoRATraining | None:
    """The LoRATraining config.lora asks for on `spec`, or None when lora.rank is 0."""
    check_lora({"lora": lora_cfg} if lora_cfg is not None else {})
    if lora_cfg is None or not lora_cfg.get("rank", 0):
        return None
    modules = _modules(spec)
    layers = []
    for key, group in (("unet_targets", "unet"), ("text_encoder_targets", "text")):
        entries = tuple(lora_cfg.get(key, ()))
        if entries and not modules[group]:
            raise ConfigError(
                f"lora.{key}={entries}: this model has no "
                f"{'UNet' if group == 'unet' else 'CLIP text encoder'} LoRA can adapt"
            )
        for entry in entries:
            chosen = [layer for module, layer in modules[group] if _matches(module, entry)]
            if not chosen:
                raise ConfigError(
                    f"lora.{key} entry {entry!r} matches no module of this model; its module "
                    f"names end in {_endings(modules[group])}"
                )
            layers += [layer for layer in chosen if layer not in layers]
    rank = int(lora_cfg.rank)
    alpha = float(lora_cfg.get("alpha", 0.0)) or float(rank)
    return LoRATraining(rank=rank, alpha=alpha, layers=tuple(layers))


def export_adapters(workdir, spec: ModelSpec, adapters, lora: LoRATraining, formats) -> list[Path]:
    """Write host adapters (numpy tree) as <workdir>/lora/<format>.safetensors, replacing this
    run's earlier export (the folder belongs to the run: each checkpoint's adapters)."""
    from ldm_jax.checkpoints.lora import save_lora  # noqa: PLC0415

    folder = Path(workdir) / EXPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = folder / f"{fmt}.safetensors"
        save_lora(path, spec, adapters, lora.alpha, fmt, overwrite=True)
        written.append(path)
    return written
