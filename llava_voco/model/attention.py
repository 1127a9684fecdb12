"""Attention backends, in one table: how the VoCo rule reaches each, what it needs, the vision tower's backend
and the line the train entry logs (docs/design.md §2.5).

The rule reaches a backend in one of three ways (``AttentionBackend.rule``):

- ``dense``: a ``[batch, 1, query, key]`` mask (``VoCoLayout.dense_mask``): boolean for sdpa, additive float
  for eager (``additive_mask``);
- ``block_mask``: the layout's mask function through transformers' ``create_causal_mask`` (flex attention's
  BlockMask);
- ``varlen``: no mask at all; the segment plan of ``varlen.build_varlen_plan`` and a kernel with
  ``flash_attn_varlen_func``'s signature (``kernel``).

Everything that names a backend reads this table: the train entry's flag, refusals and log line, the model
(``VoCoLlavaModel.prepare_attention``, ``from_pretrained``), ``builder.use_voco_attention``, the chat CLI and
the eval entry. ``register_attention_backend`` adds one, from anywhere: a ``varlen`` backend is a kernel; a
``dense`` or ``block_mask`` one that transformers does not know brings its attention function (``attention``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, flex_attention_mask, sdpa_mask

from .varlen import flash_attn_varlen, torch_varlen_attention, varlen_attention_function, varlen_reference_attention

RULES = ("dense", "block_mask", "varlen")


class AttentionBackendUnavailable(ImportError):
    """A backend asked for where it cannot run: a package it needs is missing, it needs CUDA, or it cannot train
    on this device. The message names what is missing and what runs instead."""


@dataclass(frozen=True)
class AttentionBackend:
    """One row of the table."""

    name: str  # what is asked for: --attn_implementation, from_pretrained(attn_implementation=...)
    rule: str  # how the VoCo rule reaches it: "dense", "block_mask" or "varlen" (module docstring)
    log: str  # how the rule reaches it, in words (the train entry's log line)
    vision: str | None = None  # the vision tower's backend (None: the same; a varlen kernel is causal: "sdpa")
    package: str | None = None  # a module it imports (checked before any weight is read) ...
    install: str = ""  # ... and how to get it
    cuda_only: str | None = None  # why it runs on CUDA only; None: it runs on CPU
    cpu_no_training: str | None = None  # why it cannot train on CPU; None: it can
    kernel: Callable | None = None  # varlen: flash_attn_varlen_func's signature
    attention: Callable | None = None  # a dense / block_mask backend transformers does not know: its attention function
    additive_mask: bool = False  # dense: an additive float mask (eager) rather than a boolean one
    voco_name: str | None = None  # the name it runs as on a VoCo model, when that differs (flash-attn's kernel
    # through the plan, where transformers' own flash path would keep only padding)

    @property
    def implementation(self) -> str:
        """The ``attn_implementation`` a VoCo model's language model runs."""
        return self.voco_name or self.name

    @property
    def vision_implementation(self) -> str:
        return self.vision or self.name

    def check(self, *, on_cpu: bool | None = None, training: bool = False) -> None:
        """Raise ``AttentionBackendUnavailable`` when this backend cannot run here (``on_cpu`` None: the device
        is not known yet, only packages are checked)."""
        on_cpu_instead = f"on CPU use {_cpu_alternatives(training)}"
        if self.package is not None and importlib.util.find_spec(self.package) is None:
            raise AttentionBackendUnavailable(
                f"attn_implementation={self.name!r} needs the {self.package} package"
                f"{' (CUDA only)' if self.cuda_only else ''}: {self.install}; {on_cpu_instead}"
            )
        if on_cpu and self.cuda_only:
            raise AttentionBackendUnavailable(f"{self.cuda_only}; {on_cpu_instead}")
        if on_cpu and training and self.cpu_no_training:
            raise AttentionBackendUnavailable(f"{self.cpu_no_training}, so it cannot train here; {on_cpu_instead}")


_BACKENDS: dict[str, AttentionBackend] = {}
_MASK_BUILDERS = {"dense": sdpa_mask, "block_mask": flex_attention_mask}


def register_attention_backend(backend: AttentionBackend, *, replace: bool = False) -> None:
    """Add ``backend`` to the table and make its name an ``attn_implementation`` transformers accepts (a varlen
    kernel, or an ``attention`` function, is registered with ``AttentionInterface``, beside the mask builder its
    rule needs). A name already in the table is refused unless ``replace``."""
    if backend.rule not in RULES:
        raise ValueError(f"attention backend {backend.name!r}: rule must be one of {RULES}, got {backend.rule!r}")
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"attention backend {backend.name!r} is registered already")
    if backend.rule == "varlen":
        if backend.kernel is None:
            raise ValueError(f"attention backend {backend.name!r}: a varlen backend needs its kernel")
        AttentionInterface.register(backend.implementation, varlen_attention_function(backend.kernel))
        # flash-attention's mask builder: padding only, or nothing; the rule travels in the plan
        AttentionMaskInterface.register(backend.implementation, flash_attention_mask)
    elif backend.attention is not None:
        AttentionInterface.register(backend.implementation, backend.attention)
        builder = eager_mask if backend.additive_mask else _MASK_BUILDERS[backend.rule]
        AttentionMaskInterface.register(backend.implementation, builder)
    _BACKENDS[backend.name] = backend


def attention_backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def attention_backend(name: str) -> AttentionBackend:
    """The backend asked for as ``name``; an unknown name is a ``ValueError`` listing the table."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"attn_implementation {name!r}: supported: {', '.join(_BACKENDS)}") from None


def backend_running(implementation: str) -> AttentionBackend | None:
    """The backend whose kernel a language model configured with ``implementation`` runs; None for one this
    table does not know."""
    for backend in _BACKENDS.values():
        if implementation in (backend.name, backend.implementation):
            return backend
    return None


def implementation_with_voco(implementation: str) -> str:
    """What a language model configured with ``implementation`` runs once VoCo is on (flash-attn's kernel
    through the VoCo plan in place of transformers' own flash path, which would drop the rule)."""
    backend = _BACKENDS.get(implementation)
    return backend.implementation if backend is not None else implementation


def check_requested(attn_implementation: str | dict | None) -> None:
    """What ``from_pretrained(attn_implementation=...)`` asks for, checked before any weight is read: a backend
    of the table whose package is missing is refused naming it."""
    asked = attn_implementation.values() if isinstance(attn_implementation, dict) else [attn_implementation]
    for name in asked:
        if name in _BACKENDS:
            _BACKENDS[name].check()


def implementations_for(name: str) -> dict[str, str]:
    """``from_pretrained``'s ``attn_implementation`` for a language model asked to run ``name``: checked first (a
    missing package is refused before any weight is read), the vision tower on the table's vision backend
    (``name`` itself for a backend the table does not know)."""
    backend = _BACKENDS.get(name)
    if backend is not None:
        backend.check()
    vision = backend.vision_implementation if backend is not None else name
    return {"": vision, "text_config": name, "vision_config": vision}


def _cpu_alternatives(training: bool) -> str:
    names = [b.name for b in _BACKENDS.values()
             if not b.cuda_only and b.package is None and not (training and b.cpu_no_training)]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


for _backend in (
    AttentionBackend("sdpa", "dense", "VoCo rule as a dense boolean mask"),
    AttentionBackend("eager", "dense", "VoCo rule as a dense additive mask", additive_mask=True),
    AttentionBackend("flex_attention", "block_mask", "VoCo rule as a flex BlockMask",
                     cpu_no_training="torch's flex attention has no backward on CPU"),
    AttentionBackend("varlen_reference", "varlen", "VoCo rule as a varlen segment plan, pure-torch kernel",
                     vision="sdpa", kernel=varlen_reference_attention),
    AttentionBackend("varlen_torch", "varlen", "VoCo rule as a varlen segment plan, torch's CUDA varlen kernel",
                     vision="sdpa", kernel=torch_varlen_attention, cuda_only="torch's varlen kernel runs on CUDA only"),
    AttentionBackend("flash_attention_2", "varlen", "VoCo rule as a varlen segment plan, flash-attn's kernel",
                     package="flash_attn", install="pip install 'llava-voco[gpu]'",
                     cuda_only="flash-attn runs on CUDA only", kernel=flash_attn_varlen,
                     voco_name="voco_flash_attention_2"),
):
    register_attention_backend(_backend)


__all__ = [
    "AttentionBackend",
    "AttentionBackendUnavailable",
    "RULES",
    "attention_backend",
    "attention_backend_names",
    "backend_running",
    "check_requested",
    "implementation_with_voco",
    "implementations_for",
    "register_attention_backend",
]
