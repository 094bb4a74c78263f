"""Adapters a pipeline loads on top of its checkpoint: LoRA files and textual inversions.

Both change the parameter pytree on the host, outside the compiled sampling function: LoRAs are
merged into the kernels they adapt (same shapes, so loading, rescaling and unloading never
recompile), textual inversions add tokens and embedding rows (a new vocabulary size is a new
parameter shape: one more compile). Each keeps what it replaced, so unloading restores the
checkpoint's params bit-exactly. ``LatentDiffusionPipeline`` mixes this class in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import flax
import jax
import numpy as np

from ldm_jax.checkpoints.lora import merged_kernels, read_lora, replace_leaves
from ldm_jax.checkpoints.textual_inversion import SDXL_KEYS as SDXL_TI_KEYS
from ldm_jax.checkpoints.textual_inversion import (
    TextualInversionError,
    read_textual_inversion,
)


class AdapterMixin:
    """LoRA and textual-inversion methods of ``LatentDiffusionPipeline`` (they use its
    ``spec``, ``params``, ``tokenizer``, ``cond_stage`` and ``modules``)."""

    # --- LoRA adapters: merged on the host into the params the compiled function takes, so
    # loading, rescaling and unloading them never recompiles (same shapes, dtypes, shardings).

    def load_lora(self, path, scale: float = 1.0, *, name: str | None = None,
                  strict: bool = True) -> str:  # fmt: skip
        """Merge a LoRA file (kohya / A1111 or diffusers / PEFT ``.safetensors``, or a pickled
        ``.ckpt``/``.pt`` read weights-only) into the UNet and text encoder(s), weighted by
        ``scale``: W' = W + sum over loaded LoRAs of scale * (alpha / rank) * up @ down.
        Returns its name (``name``, default the file's stem). ``strict=False`` leaves keys that
        name no layer of this model out with a warning instead of an UnsupportedLoRAError; wrong
        shapes and non-finite values are always an error, and nothing changes on any error."""
        loras = self._lora_adapters()
        name = Path(path).stem if name is None else str(name)
        if name in loras:
            raise ValueError(f"a LoRA named {name!r} is loaded already; unload it or pass name=")
        scale = _lora_scale(name, scale)
        base = self._lora_base if loras else self.params
        lora = read_lora(path, self.spec, base, strict=strict)
        if not loras:
            self._lora_base, self._lora_host = self.params, {}
        loras[name] = (lora, scale)
        self._merge_loras()
        return name

    def set_lora_scales(self, scales: Mapping[str, float]) -> None:
        """New scales for loaded LoRAs ({name: scale}); the others keep theirs."""
        loras = self._lora_adapters()
        unknown = sorted(set(scales) - set(loras))
        if unknown:
            raise ValueError(f"no LoRA named {unknown} is loaded; loaded: {sorted(loras)}")
        checked = {name: _lora_scale(name, scale) for name, scale in scales.items()}
        for name, scale in checked.items():
            loras[name] = (loras[name][0], scale)
        self._merge_loras()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all, the default); with none left the params are the original
        arrays again (bit-exact)."""
        loras = self._lora_adapters()
        if name is not None and name not in loras:
            raise ValueError(f"no LoRA named {name!r} is loaded; loaded: {sorted(loras)}")
        for key in [name] if name is not None else list(loras):
            del loras[key]
        self._merge_loras()

    @property
    def loras(self) -> dict[str, float]:
        """The loaded LoRAs' names and scales."""
        return {name: scale for name, (_, scale) in self._lora_adapters().items()}

    def _lora_adapters(self) -> dict:
        if getattr(self, "_loras", None) is None:
            self._loras = {}  # name -> (LoRA, scale), in loading order
        return self._loras

    def _merge_loras(self) -> None:
        loras = self._lora_adapters()
        if getattr(self, "_lora_base", None) is None:
            return
        if not loras:
            self.params, self._lora_base, self._lora_host = self._lora_base, None, {}
            return
        base = flax.traverse_util.flatten_dict(self._lora_base)

        def host_leaf(where):  # the base kernel on the host, fetched once
            if where not in self._lora_host:
                self._lora_host[where] = np.asarray(jax.device_get(base[where]))
            return self._lora_host[where]

        merged = merged_kernels(host_leaf, loras.values())
        placed = {where: jax.device_put(v, base[where].sharding) for where, v in merged.items()}
        self.params = replace_leaves(self._lora_base, placed)

    # --- textual inversion: new tokens and embedding rows. The vocabulary size is a param shape,
    # so the first call after loading or unloading compiles once more (then cached per size).

    def load_textual_inversion(self, path_or_array, token: str | None = None) -> tuple[str, ...]:
        """Add a textual-inversion embedding: an A1111 ``.pt`` (string_to_param), an
        A1111/civitai ``.safetensors`` (emb_params), a diffusers ``learned_embeds.bin`` /
        ``.safetensors`` ({token: vectors}), a state dict, or an array [D] / [n, D] (needs
        ``token``); SDXL (base and refiner) takes files with ``clip_l`` / ``clip_g`` vectors,
        one per text encoder. The token defaults to the file's (A1111 ``name``, the diffusers
        key, else the file's stem). An n-vector embedding adds ``tok``, ``tok_1``, ...,
        ``tok_{n-1}`` and a prompt's ``tok`` expands to all of them, as diffusers'
        ``maybe_convert_prompt`` does. Returns the added tokens. TextualInversionError (a
        ValueError) for a width other than the text encoder's, NaN/inf values, a token already
        in the vocabulary or an unknown file layout; nothing changes on any error. The text
        encoders' vocab_size grows, so the next call compiles once more."""
        encoders = self._ti_encoders()
        ti = read_textual_inversion(path_or_array, token)
        keys = [key for _, key in encoders]
        missing = [key for key in keys if key not in ti.vectors]
        if missing:
            needs = "one [n, D] embedding (SD 1.x/2.x)" if keys == [""] else f"{keys} vectors"
            raise TextualInversionError(
                f"{ti.source} holds {sorted(ti.vectors) if keys != [''] else 'SDXL'} vectors; "
                f"this model's text encoders need {needs}"
            )
        flat = flax.traverse_util.flatten_dict(self.params)
        for where, key in encoders:
            width, expected = ti.vectors[key].shape[1], flat[where].shape[1]
            if width != expected:
                raise TextualInversionError(
                    f"{ti.source}{' ' + key if key else ''}: embedding width {width} does not "
                    f"fit this text encoder's {expected} (an embedding trained for another "
                    "model, e.g. SD 2.x (1024) on SD 1.x (768))"
                )
        tokenizers = self._ti_tokenizers()
        try:
            added = [tokenizer.with_added_tokens(ti.tokens) for tokenizer in tokenizers]
        except ValueError as error:
            raise TextualInversionError(f"{ti.source}: {error}") from None
        if getattr(self, "_ti_base", None) is None:  # what unload_textual_inversion restores
            tables = {where: flat[where] for where, _ in encoders}
            self._ti_base = (self.spec, self.tokenizer, self.cond_stage, tables)
        tables = {}
        for where, key in encoders:
            host_VD = np.asarray(jax.device_get(flat[where]))
            rows = np.concatenate([host_VD, ti.vectors[key].astype(host_VD.dtype)])
            tables[where] = jax.device_put(rows, flat[where].sharding)
        tokenizer = added[0] if len(keys) == 1 and keys == [""] else type(self.tokenizer)(added)
        self._set_vocabulary(tokenizer, tables)
        return ti.tokens

    def unload_textual_inversion(self) -> None:
        """Remove every loaded embedding: the original tokenizer, spec and embedding tables."""
        base = getattr(self, "_ti_base", None)
        if base is None:
            return
        spec, tokenizer, module, tables = base
        self._set_vocabulary(tokenizer, tables, spec, module)
        self._ti_base = None

    def _ti_encoders(self) -> list[tuple[tuple[str, ...], str]]:
        """(params path of the token table, the file's key) per text encoder."""
        cond = self.spec.cond_stage
        table = ("token_embedding", "embedding")
        if cond is not None and cond.kind in ("clip", "openclip"):
            return [(("cond_stage", *table), "")]
        if cond is not None and cond.kind == "sdxl":  # refiner: bigG only
            keys = SDXL_TI_KEYS[-len(cond.config.text_encoders) :]
            return [(("cond_stage", f"encoder_{i}", *table), k) for i, k in enumerate(keys)]
        raise TextualInversionError(
            "textual inversion needs CLIP/OpenCLIP text encoders (SD 1.x/2.x/XL); this model's "
            f"cond stage is {None if cond is None else cond.kind!r}"
        )

    def _ti_tokenizers(self) -> list:
        sdxl = self.spec.cond_stage.kind == "sdxl"
        return list(self.tokenizer.tokenizers) if sdxl else [self.tokenizer]

    def _set_vocabulary(self, tokenizer, tables, spec=None, module=None) -> None:
        if spec is None:
            cond = self.spec.cond_stage
            sizes = [int(table.shape[0]) for table in tables.values()]
            if cond.kind == "sdxl":
                encoders = tuple(
                    dataclasses.replace(e, vocab_size=n)
                    for e, n in zip(cond.config.text_encoders, sizes, strict=True)
                )
                config = dataclasses.replace(cond.config, text_encoders=encoders)
            else:
                config = dataclasses.replace(cond.config, vocab_size=sizes[0])
            spec = dataclasses.replace(
                self.spec, cond_stage=dataclasses.replace(cond, config=config)
            )
            module = self.cond_stage.clone(config=config)
        self.params = replace_leaves(self.params, tables)
        if getattr(self, "_lora_base", None) is not None:  # LoRAs leave the embeddings alone
            self._lora_base = replace_leaves(self._lora_base, tables)
        self.spec, self.tokenizer, self.cond_stage = spec, tokenizer, module
        self.modules = {**self.modules, "cond_stage": module}



def _lora_scale(name: str, scale) -> float:
    scale = float(scale)
    if not np.isfinite(scale):
        raise ValueError(f"the scale of LoRA {name!r} must be a finite number, got {scale}")
    return scale
