"""The plugin contract, checked on every built component, and the plugin API version.

Each kind of component is called by the core (and by the built-in methods) in fixed ways:
``dataset.train(seed=..., epoch=..., shard=..., num_shards=..., start=...)``,
``decoder.log_prob(x, params)``, ``metric.update(batch)``. :data:`CONTRACTS` lists those calls;
:func:`check_contract` binds each one to the built object's method with
:func:`inspect.signature`, so a plugin written for another contract is refused when its recipe
is validated or built, with one message naming the component, its plugin and package, what the
contract expects and what was found, instead of a ``TypeError`` deep inside a DataLoader worker.

A package declares the API it was written for with a module constant in its entry-point
module, ``NGKIT_PLUGIN_API = 3``; :data:`CHANGES` says what each version changed. A dataset
declared for API 1 runs through :class:`DatasetV1Adapter`, and one declared for API 1 or 2 behind
:class:`FloatPixels`, which holds it to that API's float pixels.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ngkit import PLUGIN_API
from ngkit.components import Example, ImageSpec
from ngkit.errors import ContractError

CHANGES: dict[int, str] = {
    1: "the first API: dataset train(*, seed, rank, world_size) yields [C, H, W] tensors forever, "
       "test(*, rank, world_size, limit)",
    2: "dataset train(*, seed, epoch, shard, num_shards, start=0) yields lazy Example objects of one "
       "epoch and test(*, shard, num_shards, limit) (rank, world_size became shard, num_shards); methods "
       "declare can_sample, metrics expensive",
    3: "a dataset's training Example.load() may return uint8 [C, H, W] in 0-255, which the core divides "
       "by 255 once per batch; before, only float in [0, 1]",
}

DOCS = "docs/writing-a-plugin.md"


@dataclass(frozen=True)
class Call:
    """One way the core calls a component: ``method(*positional, **keywords)``."""

    method: str
    positional: tuple[str, ...] = ()  # names for the message; passed by position
    keywords: tuple[str, ...] = ()  # passed by keyword
    required: bool = True  # False: the component may lack the method (then it is not called)

    def text(self) -> str:
        args = [*self.positional, *(f"{k}=" for k in self.keywords)]
        return f"{self.method}({', '.join(args)})"


@dataclass(frozen=True)
class Contract:
    calls: tuple[Call, ...]
    attributes: tuple[str, ...] = ()  # attributes the core reads
    module: bool = False  # must be an nn.Module (its parameters train and checkpoint)
    flags: tuple[str, ...] = ()  # declared capabilities (bool attributes, False when absent)
    section: str = ""  # the docs section, e.g. "#2-datasets"


_ENCODER_CALLS = (
    Call("features", ("x",), required=False),
    Call("log_prob", ("x", "z"), required=False),
    Call("sample", ("x", "num_samples"), required=False),
    Call("sample_log_prob", ("x", "num_samples"), required=False),
    Call("mode", ("x",), required=False),
    Call("relaxed_sample", ("x", "temperature", "hard"), required=False),
    Call("split_codes", ("dst", "src"), required=False),
)

CONTRACTS: dict[str, Contract] = {
    "datasets": Contract(
        (Call("train", keywords=("seed", "epoch", "shard", "num_shards", "start")),
         Call("test", keywords=("shard", "num_shards", "limit")),
         Call("labelled", ("split",), required=False)),
        attributes=("spec",), section="#2-datasets",
    ),
    "encoders": Contract(_ENCODER_CALLS, module=True, section="#3-encoders"),
    "decoders": Contract(
        (Call("embed", ("z",)), Call("forward", ("h",)), Call("log_prob", ("x", "params")), Call("mean", ("params",)),
         Call("split_codes", ("dst", "src", "noise", "generator"), required=False)),
        attributes=("embed_dim",), module=True, section="#4-decoders",
    ),
    "methods": Contract(
        (Call("forward", ("x", "step")), Call("encode", ("x",)), Call("decode", ("z",)),
         Call("after_step", ("step",), required=False), Call("beta_elbo", ("x", "beta"), required=False),
         Call("sample_codes", ("x",), required=False)),
        attributes=("latent",), module=True, flags=("can_sample",), section="#5-methods",
    ),
    "posterior_proxies": Contract((Call("__call__", ("logp", "logq", "eta", "beta")),), section="#6-posterior-proxies-step-size-policies-β-schedules"),
    "step_size_policies": Contract(
        (Call("eta", ("logp", "logq", "beta")), Call("update", ("logp", "logq", "beta"))),
        section="#6-posterior-proxies-step-size-policies-β-schedules",
    ),
    "beta_schedules": Contract((Call("__call__", ("step",)),), section="#6-posterior-proxies-step-size-policies-β-schedules"),
    "quantizers": Contract(
        (Call("forward", ("h",)), Call("codes_to_vectors", ("codes",)), Call("after_step")),
        attributes=("dim",), module=True, section="#7-quantizers",
    ),
    "metrics": Contract((Call("update", ("batch",)), Call("compute"), Call("protocol")), flags=("expensive",),
                        section="#8-metrics"),
    "losses": Contract((Call("__call__", ("images", "reconstructions")),), section="#9b-reconstruction-losses"),
    "priors": Contract(
        (Call("loss", ("codes", "labels")), Call("sample", ("labels",)),
         Call("sample", ("labels",), ("guidance", "generator"))),
        attributes=("latent", "classes"), module=True, section="#9-priors-over-codes",
    ),
}


def _signature_text(method: Any) -> str:
    try:
        return f"{getattr(method, '__name__', 'method')}{inspect.signature(method)}"
    except (TypeError, ValueError):
        return repr(method)


def _call_problem(obj: Any, call: Call) -> str | None:
    method = getattr(obj, call.method, None) if call.method != "__call__" else (obj if callable(obj) else None)
    if method is None or not callable(method):
        return f"has no method {call.text()}" if call.required else None
    try:
        signature = inspect.signature(method)
    except (TypeError, ValueError):  # a builtin without a signature: cannot be checked
        return None
    try:
        signature.bind(*call.positional, **{k: None for k in call.keywords})
    except TypeError as exc:
        return f"must accept {call.text()}; found {_signature_text(method)}: {_why(signature, call, exc)}"
    return None


def _why(signature: inspect.Signature, call: Call, exc: TypeError) -> str:
    """The keyword parameters missing and those required that ngkit never passes, else ``exc``."""
    params = signature.parameters
    if not call.keywords or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return str(exc)
    named = [p for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [k for k in call.keywords if k not in {p.name for p in named}]
    extra = [p.name for p in named[len(call.positional):] if p.default is p.empty and p.name not in call.keywords]
    parts = ([f"no parameter {', '.join(missing)}"] if missing else []) + (
        [f"requires {', '.join(extra)}, which ngkit does not pass"] if extra else [])
    return "; ".join(parts) or str(exc)


def contract_problems(kind: str, obj: Any) -> list[str]:
    """What ``obj`` (a built component of ``kind``) lacks of its contract, one phrase each."""
    contract = CONTRACTS.get(kind)
    if contract is None:
        return []
    problems = []
    if contract.module and not isinstance(obj, nn.Module):
        problems.append(f"must be a torch.nn.Module (its state trains and is checkpointed); found {type(obj).__name__}")
    problems += [f"has no attribute {a!r}" for a in contract.attributes if not hasattr(obj, a)]
    problems += [p for call in contract.calls if (p := _call_problem(obj, call)) is not None]
    for flag in ("can_sample", "expensive"):
        if flag in contract.flags and not isinstance(getattr(obj, flag, False), bool):
            problems.append(f"declares {flag} = {getattr(obj, flag)!r}; it must be True or False")
    if kind == "methods" and getattr(obj, "can_sample", False) is True and not callable(getattr(obj, "sample_codes", None)):
        problems.append("declares can_sample = True but has no method sample_codes(x)")
    if kind == "datasets" and hasattr(obj, "spec") and not isinstance(obj.spec, ImageSpec):
        problems.append(f"spec must be an ngkit.components.ImageSpec; found {type(obj.spec).__name__}")
    return problems


def looks_like_api1_dataset(obj: Any) -> bool:
    """A dataset whose ``train`` takes API 1's ``rank`` and ``world_size``."""
    try:
        params = inspect.signature(obj.train).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "rank" in params and "world_size" in params and "epoch" not in params


def api_note(declared: int | None, module: str, api1_dataset: bool = False) -> str:
    """What changed since the API a package declares, and what to set (empty when it declares
    this API). ``api1_dataset``: an undeclared dataset that has API 1's signature."""
    if declared == PLUGIN_API:
        return ""
    if declared is None and api1_dataset:
        return (f" Its train() takes API 1's rank and world_size. What changed: {_changes_since(1)}. Update it "
                f"and set NGKIT_PLUGIN_API = {PLUGIN_API} in {module}, or set NGKIT_PLUGIN_API = 1 there to run it "
                f"unchanged through ngkit's API-1 adapter.")
    if declared is None:
        return (f" The package declares no NGKIT_PLUGIN_API (this ngkit speaks API {PLUGIN_API}): fix the "
                f"plugin and set NGKIT_PLUGIN_API = {PLUGIN_API} in {module}.")
    return f" The package declares NGKIT_PLUGIN_API = {declared}; this ngkit speaks API {PLUGIN_API}. What changed: {_changes_since(declared)}."


def _changes_since(declared: int) -> str:
    return "; ".join(f"API {v}: {CHANGES[v]}" for v in range(declared + 1, PLUGIN_API + 1))


class DatasetV1Adapter:
    """An API-1 dataset (``train(seed, rank, world_size)`` yielding tensors forever) behind the
    API-2 contract: its endless stream is one epoch that never ends, shard ``s`` of ``n`` is the
    old stream of rank ``s`` of ``n``, and ``start`` skips that many of its images (decoded, as
    API 1 had no lazy examples). Exact on resume when the old stream is a function of its seed."""

    endless = True

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.spec = dataset.spec

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        stream = self.dataset.train(seed=seed + epoch, rank=shard, world_size=num_shards)
        for i, image in enumerate(itertools.islice(stream, start, None), start):
            yield Example(load=lambda image=image: image, name=f"image {i} of shard {shard}")

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterable[Tensor]:
        return self.dataset.test(rank=shard, world_size=num_shards, limit=limit)

    def __getattr__(self, name: str) -> Any:  # e.g. labelled(), the dataset's own options
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class FloatPixels:
    """A dataset whose package declares API 1 or 2, held to that API's pixels: float in [0, 1].

    uint8 came with API 3 (:data:`CHANGES`). An older ngkit cast a uint8 image to float and trained
    on 0-255 values, so a uint8 training image from a package written for it is a broken contract,
    refused with :class:`ContractError` (never skipped as an unreadable file), not silently divided
    by 255. Everything else passes through unchanged."""

    def __init__(self, dataset: Any, declared: int, module: str) -> None:
        self.dataset, self.declared, self.module = dataset, declared, module
        self.spec = dataset.spec

    def _float(self, img: Any, where: str) -> Any:
        if isinstance(img, Tensor) and img.dtype == torch.uint8:
            raise ContractError(
                f"{where} is uint8, but {self.module} declares NGKIT_PLUGIN_API = {self.declared}, whose images "
                f"are float in [0, 1] (uint8 0-255 pixels are API 3: {CHANGES[3]}). Set NGKIT_PLUGIN_API = 3 "
                f"in {self.module} if its uint8 images are 0-255, or return float in [0, 1] "
                f"(see {DOCS}#plugin-api-versions)")
        return img

    def train(self, *, seed: int, epoch: int, shard: int, num_shards: int, start: int = 0) -> Iterator[Example]:
        for i, ex in enumerate(self.dataset.train(seed=seed, epoch=epoch, shard=shard, num_shards=num_shards,
                                                  start=start), start):
            where = f"training image {ex.name!r}" if ex.name else f"training image {i} of shard {shard}"
            yield Example(load=lambda ex=ex, where=where: self._float(ex.load(), where), name=ex.name)

    def test(self, *, shard: int, num_shards: int, limit: int | None) -> Iterable[Tensor]:
        return self.dataset.test(shard=shard, num_shards=num_shards, limit=limit)

    def __getattr__(self, name: str) -> Any:  # endless, labelled(), the dataset's own options
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
