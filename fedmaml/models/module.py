"""A user's ``torch.nn.Module`` as a fedmaml model (docs/custom.md, "Your own model").

fedmaml keeps parameters outside the model (``name -> Tensor`` dicts, :mod:`fedmaml.core.params`)
and calls the module functionally with ``torch.func.functional_call``, so every algorithm,
meta-gradient estimator, memory policy and engine works with it. :class:`ModuleModel` offers the
interface of :class:`~fedmaml.models.base.StagedModel` (layer groups, ``init``, ``forward`` with
``start``/``stop``). The built-in MLP, linear model and Conv-4 are ordinary ``nn.Sequential``
modules on this same path (fedmaml/models/mlp.py, conv4.py).

Layer groups (the columns of a Lambda pattern), input side first:

* by default, the module's top-level children that own parameters, in *registration* order (the
  order of ``named_children()``, which fedmaml takes as the forward order: fedmaml cannot see the
  order ``forward`` uses them in);
* or ``groups``: an ordered mapping ``group name -> parameter-name prefixes``; every parameter must
  belong to exactly one group.

A module whose groups are consecutive runs of the children of an ``nn.Sequential`` is *staged*:
its forward can start and stop between groups, so a frozen prefix is run once and cached and no
backward goes through it, exactly as for StagedModel. Any other module runs whole; gradients are
still requested only for the adapted groups, so autograd computes no weight gradients for frozen
ones and stops backpropagation where the graph allows, but nothing is cached.

Buffers: BatchNorm layers always normalise with the current batch's statistics (MAML's convention,
and the built-in Conv-4's): their running statistics are removed from fedmaml's copy of the module,
so no client and no meta-model keeps or federates them. Other buffers are constants (as the factory
made them, the same on every client, never federated); a module that writes a buffer in ``forward``
is refused. The module runs in eval mode (dropout off), so a forward is a pure function. A module
that changes a stage's input in place gets copies (:meth:`ModuleModel.check` finds it).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmaml.core.params import Params
from fedmaml.models.base import max_pool_2x2
from fedmaml.errors import ConfigError
from fedmaml.user_objects import Registry, is_user_object, parse_mapping

if TYPE_CHECKING:  # an annotation only: models stay usable without the config package
    from fedmaml.config.schema import ModelConfig

ModelSource = Union[nn.Module, Callable[..., nn.Module]]

#: ``model.name`` of a model given from Python (:func:`register`): lives only in this process.
_MODELS = Registry("model.name", "package.module:factory")


def is_user_model(name: str) -> bool:
    """``model.name`` names a user's module (an import path or a registered Python object)."""
    return is_user_object(name)


def register(source: ModelSource) -> str:
    """Make a module or factory given from Python usable as ``model.name``; return that name.

    A factory that can be imported by name (defined at the top level of an importable module)
    becomes its import path, which other processes (Ray workers, devices) can resolve too.
    Anything else (a module instance, a lambda, a function of ``__main__``) gets a
    ``python:...`` name that only this process knows.
    """
    return _MODELS.register(source)


def load_source(name: str) -> ModelSource:
    """The module or factory ``model.name`` points to; a clear error otherwise."""
    source = _MODELS.load(name, "a callable returning an nn.Module")
    if not (isinstance(source, nn.Module) or callable(source)):
        raise ConfigError(f"model.name: {name!r} is a {type(source).__name__}, not an nn.Module "
                          "or a callable returning one")
    return source


def build_module(source: ModelSource, kwargs: Mapping[str, Any], input_shape: Sequence[int] | None,
                 num_outputs: int | None, seed: int | None, name: str) -> nn.Module:
    """Call a factory (``kwargs``, plus ``input_shape`` / ``num_outputs`` when its signature asks
    for them) with torch's global generator seeded by ``seed``; a module is returned as is."""
    if isinstance(source, nn.Module):
        if kwargs:
            raise ConfigError(f"model.kwargs: {name} is a module instance, which takes no "
                              f"arguments; got {dict(kwargs)}")
        return source
    args = dict(kwargs)
    try:
        params = inspect.signature(source).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (("input_shape", input_shape), ("num_outputs", num_outputs)):
        if key in params and key not in args:
            if value is None:
                raise ConfigError(f"model.name: {name} asks for {key}, which comes from the data; "
                                  "give a config with the data section, or model.kwargs")
            args[key] = list(value) if key == "input_shape" else value
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            module = source(**args)
        except TypeError as e:
            raise ConfigError(f"model.kwargs: calling {name} with {args} failed: {e}") from None
        except Exception as e:  # noqa: BLE001 - the factory's own refusal (e.g. of the data's shape)
            raise ConfigError(f"model.name: calling {name} with {args} raised "
                              f"{type(e).__name__}: {e} ({_where(e)})") from e
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.name: {name} returned a {type(module).__name__}, not a "
                          "torch.nn.Module")
    return module


def _where(error: BaseException) -> str:
    """Where the user's code raised ``error``: the innermost frame outside fedmaml and installed
    packages (torch's own frames say little about the user's call), file name and line."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = str(Path(__file__).resolve().parents[1]) + os.sep
    user = [f for f in frames if "-packages" not in f.filename
            and not str(Path(f.filename).resolve()).startswith(ours)]
    frame = (user or frames or [None])[-1]
    return "?" if frame is None else f"{Path(frame.filename).name}, line {frame.lineno}"


def _functional_copy(module: nn.Module) -> nn.Module:
    """A copy in eval mode whose BatchNorm layers use batch statistics and keep none."""
    m = copy.deepcopy(module)
    for sub in m.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.track_running_stats = False
            sub.running_mean = None
            sub.running_var = None
            sub.num_batches_tracked = None
    return m.eval()


def _owns(prefix: str, param: str) -> bool:
    return param == prefix or param.startswith(prefix + ".")


def resolve_groups(module: nn.Module, groups: Mapping[str, Any] | None
                   ) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """``(group names, parameter names of each group)``; every parameter in exactly one group."""
    names = [n for n, _ in module.named_parameters()]
    if not names:
        raise ConfigError("model.name: the module has no parameters; there is nothing to learn")
    if not groups:  # top-level children that own parameters, in registration order
        out = [(c, tuple(n for n in names if _owns(c, n))) for c, _ in module.named_children()]
        out = [(c, ps) for c, ps in out if ps]
        loose = [n for n in names if not any(_owns(c, n) for c, _ in out)]
        if loose:
            raise ConfigError(f"model.groups: parameters {loose} belong to no top-level child "
                              "of the module, so they are in no default layer group; declare "
                              "model.groups (group name -> parameter-name prefixes)")
        return tuple(c for c, _ in out), tuple(ps for _, ps in out)
    members: dict[str, list[str]] = {n: [] for n in names}
    group_params = []
    for g, prefixes in groups.items():
        prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
        if not isinstance(prefixes, (list, tuple)) or not prefixes or not all(
                isinstance(p, str) for p in prefixes):
            raise ConfigError(f"model.groups.{g}: expected a list of parameter-name prefixes, got "
                              f"{prefixes!r}")
        mine = tuple(n for n in names if any(_owns(p, n) for p in prefixes))
        unmatched = [p for p in prefixes if not any(_owns(p, n) for n in names)]
        if unmatched:
            raise ConfigError(f"model.groups.{g}: prefixes {unmatched} match no parameter; "
                              f"parameters: {names}")
        for n in mine:
            members[n].append(g)
        group_params.append(mine)
    twice = {n: gs for n, gs in members.items() if len(gs) > 1}
    none = [n for n, gs in members.items() if not gs]
    if twice or none:
        parts = ([f"in several groups: " + ", ".join(f"{n} ({', '.join(gs)})"
                                                     for n, gs in twice.items())] if twice else []
                 ) + ([f"in no group: {none}"] if none else [])
        raise ConfigError("model.groups: every parameter must belong to exactly one group; "
                          + "; ".join(parts))
    return tuple(groups), tuple(group_params)


#: Exact leaf types whose forward is one functional op of (input, weight, bias): called directly,
#: since ``functional_call`` costs about as much as the op itself on the small layers of
#: meta-learning (subclasses may override ``forward``, so only the exact types).
_FAST: dict[type, Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]] = {
    nn.Linear: lambda m, h, w, b: F.linear(h, w, b),
    nn.Conv1d: lambda m, h, w, b: m._conv_forward(h, w, b),
    nn.Conv2d: lambda m, h, w, b: m._conv_forward(h, w, b),
    # fedmaml's copy keeps no running statistics: batch statistics, as in nn.BatchNorm's forward
    nn.BatchNorm1d: lambda m, h, w, b: F.batch_norm(h, None, None, w, b, True, 0.0, m.eps),
    nn.BatchNorm2d: lambda m, h, w, b: F.batch_norm(h, None, None, w, b, True, 0.0, m.eps),
}


#: Exact parameter-free leaf types run as their functional op (a module call's hooks bookkeeping
#: costs more than the op on small layers).
_FREE: dict[type, Callable[[nn.Module, Tensor], Tensor]] = {
    nn.ReLU: lambda m, h: F.relu(h, m.inplace),
    nn.Flatten: lambda m, h: h.flatten(m.start_dim, m.end_dim),
}


def _leaves(m: nn.Module, name: str):
    """``(name, module)`` of what ``m`` runs in order: a Sequential's children in turn (so the fast
    paths apply inside nested Sequentials), any other module as one leaf."""
    if type(m) is nn.Sequential:
        for c, child in m.named_children():
            yield from _leaves(child, f"{name}.{c}")
    else:
        yield name, m


def _is_pool_2x2(m: nn.Module) -> bool:
    """A plain 2x2 max-pool (stride 2): the pool of MAML's Conv-4."""
    return (type(m) is nn.MaxPool2d and m.kernel_size in (2, (2, 2))
            and m.stride in (2, (2, 2)) and m.padding in (0, (0, 0))
            and m.dilation in (1, (1, 1)) and not m.return_indices)


def _pool_2x2(m: nn.MaxPool2d, h: Tensor) -> Tensor:
    """The same values as ``m(h)``, through the built-in Conv-4's pool (fedmaml/models/base.py:
    4-15x faster on a frozen, cached prefix, where no gradient flows)."""
    if not m.ceil_mode:  # floor mode drops an odd last row/column
        h = h[..., : h.shape[-2] // 2 * 2, : h.shape[-1] // 2 * 2]
    return max_pool_2x2(h)


class ModuleModel:
    """A user's module with layer groups; the interface of StagedModel (see the module docstring)."""

    def __init__(self, module: nn.Module, name: str, groups: Mapping[str, Any] | None = None,
                 reinit: Callable[[int], nn.Module] | None = None,
                 param_names: Mapping[str, str] | None = None) -> None:
        """``param_names`` renames the module's parameters (module name -> fedmaml's name, every
        parameter): the built-in Conv-4 keeps the names of its earlier runs' ``model.pt``."""
        self.module = _functional_copy(module)
        self.name = name
        self._reinit = reinit
        own = [n for n, _ in self.module.named_parameters()]
        rename = dict(param_names) if param_names else {n: n for n in own}
        if sorted(rename) != sorted(own) or len(set(rename.values())) != len(own):
            raise ValueError(f"param_names must rename each of {own} to a distinct name, got "
                             f"{dict(param_names or {})}")
        #: The module's parameter name -> fedmaml's (parameter dicts use fedmaml's names).
        self._outer = rename
        self._inner = None if all(k == v for k, v in rename.items()) else {
            v: k for k, v in rename.items()}
        group_names, group_params = resolve_groups(self.module, groups)
        self.group_names = group_names
        self.group_params = tuple(tuple(rename[n] for n in ps) for ps in group_params)
        self._index = {n: i for i, ps in enumerate(group_params) for n in ps}  # module names
        self._buffers = {k: v.detach() for k, v in self.module.named_buffers()}
        #: For each group, the children of the Sequential it runs; None: the module runs whole.
        self.stage_children = self._stages()
        #: For each group, its forward as a list of ``step(params, h) -> h`` resolved once here, so
        #: a forward does no name building, type dispatch or module-call bookkeeping per step.
        self._plan = None if self.stage_children is None else tuple(
            tuple(step for c, child in children for step in self._steps(child, c))
            for children in self.stage_children)
        #: The module changes a stage's input in place (found by :meth:`check`): forward copies.
        self.copies_inputs = False

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def staged(self) -> bool:
        """The forward can start and stop between groups (prefix caching, no backward through a
        frozen prefix)."""
        return self.stage_children is not None

    def _stages(self) -> tuple[tuple[tuple[str, nn.Module], ...], ...] | None:
        if type(self.module) is not nn.Sequential:  # a subclass may have its own forward
            return None
        children = list(self.module.named_children())
        owner = []  # the group of each child's parameters (None: it has none)
        for c, child in children:
            gs = {self._index[f"{c}.{n}"] for n, _ in child.named_parameters()}
            if len(gs) > 1:
                return None  # a group boundary inside a child: it runs whole
            owner.append(gs.pop() if gs else None)
        # Parameter-free children (activations, pooling) join the group before them (the first
        # group for leading ones); the groups must then be consecutive runs in group order.
        current, run = 0, []
        for g in owner:
            current = current if g is None else g
            run.append(current)
        if any(b < a for a, b in zip(run, run[1:])) or sorted(set(run)) != list(range(self.num_groups)):
            return None
        return tuple(tuple(ch for ch, g in zip(children, run) if g == i)
                     for i in range(self.num_groups))

    def init(self, seed: int) -> Params:
        """The initial parameters: the factory's module built with torch seeded by ``seed``, or
        (a module instance) its own weights whatever the seed."""
        module = self.module if self._reinit is None else self._reinit(seed)
        return {self._outer[k]: v.detach().clone() for k, v in module.named_parameters()}

    def _own_params(self) -> Params:
        """The functional copy's own weights, under fedmaml's names."""
        return {self._outer[k]: v.detach() for k, v in self.module.named_parameters()}

    def names_of(self, groups: Sequence[int]) -> list[str]:
        return [n for g in groups for n in self.group_params[g]]

    def forward(self, params: Params, x: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        stop = self.num_groups if stop is None else stop
        if self.copies_inputs:  # it would change fedmaml's tensors in place (see check)
            x = x.clone()
        if self.stage_children is None:
            if (start, stop) != (0, self.num_groups):
                raise ValueError(f"{self.name} is not staged: it runs whole (start 0, stop "
                                 f"{self.num_groups}), got start {start}, stop {stop}")
            if self._inner is not None:
                params = {self._inner[k]: v for k, v in params.items()}
            return torch.func.functional_call(self.module, {**params, **self._buffers}, (x,))
        h = x
        copies = self.copies_inputs
        for i in range(start, stop):
            if copies and i > start:
                h = h.clone()
            for step in self._plan[i]:
                h = step(params, h)
        return h

    def _steps(self, m: nn.Module, name: str) -> list[Callable[[Params, Tensor], Tensor]]:
        """``m(h)`` as steps taking ``m``'s parameters (module names ``name.*``) from ``params``."""
        leaves = list(_leaves(m, name))
        steps = []
        for j, (c, leaf) in enumerate(leaves):
            if type(leaf) is nn.ReLU and j and type(leaves[j - 1][1]) is nn.Linear:
                continue  # fused into the linear step before it
            relu = j + 1 < len(leaves) and type(leaves[j + 1][1]) is nn.ReLU
            steps.append(self._step(leaf, c, relu))
        return steps

    def _step(self, m: nn.Module, name: str, relu: bool = False
              ) -> Callable[[Params, Tensor], Tensor]:
        """One leaf ``m`` as a step; ``relu``: an ``nn.ReLU`` follows a Linear and is fused with it
        (one Python call per layer, as a hand-written stage makes)."""
        kind = type(m)
        fast = _FAST.get(kind)
        if fast is not None and m.weight is not None:  # the op, without functional_call's swaps
            w = self._outer[f"{name}.weight"]
            b = self._outer[f"{name}.bias"] if m.bias is not None else None
            if kind is nn.Linear:
                if b is None:
                    return ((lambda p, h: F.relu(F.linear(h, p[w]))) if relu else
                            (lambda p, h: F.linear(h, p[w])))
                return ((lambda p, h: F.relu(F.linear(h, p[w], p[b]))) if relu else
                        (lambda p, h: F.linear(h, p[w], p[b])))
            if kind is nn.Conv2d and m.padding_mode == "zeros" and b is not None:
                # what Conv2d._conv_forward calls, with the layer's settings bound once
                st, pad, dil, grp = m.stride, m.padding, m.dilation, m.groups
                return lambda p, h: F.conv2d(h, p[w], p[b], st, pad, dil, grp)
            if kind is nn.BatchNorm2d and b is not None:
                eps = m.eps
                return lambda p, h: F.batch_norm(h, None, None, p[w], p[b], True, 0.0, eps)
            if b is None:
                return lambda p, h: fast(m, h, p[w], None)
            return lambda p, h: fast(m, h, p[w], p[b])
        if _is_pool_2x2(m):
            if m.ceil_mode:
                return lambda p, h: max_pool_2x2(h)
            return lambda p, h: _pool_2x2(m, h)
        if kind is nn.ReLU and not m.inplace:
            return lambda p, h: F.relu(h)
        free = _FREE.get(kind)
        if free is not None:
            return lambda p, h: free(m, h)
        local = [(k, self._outer[f"{name}.{k}"]) for k, _ in m.named_parameters()]
        buffers = {k: self._buffers[f"{name}.{k}"] for k, _ in m.named_buffers()}
        if not local and not buffers:
            return lambda p, h: m(h)
        return lambda p, h: torch.func.functional_call(
            m, {**{k: p[full] for k, full in local}, **buffers}, (h,))

    __call__ = forward

    def describe(self) -> str:
        return f"{self.name} with layer groups {list(self.group_names)}"

    def check(self, input_shape: Sequence[int], num_outputs: int, data: str | None = None) -> None:
        """One forward on a probe batch: output shape, buffers left unchanged. ``data`` names the
        data the inputs' shape comes from (``data.family=sinusoid``), for the error message."""
        params = self._own_params()
        x = torch.randn(3, *input_shape, generator=torch.Generator().manual_seed(0))
        before = {k: v.clone() for k, v in self._buffers.items()}
        try:
            with torch.no_grad():
                out = self._probe_inputs(params, x)
        except Exception as e:  # noqa: BLE001 - any failure of the user's forward, reported
            failed = (f"model.name: {self.name} failed on a batch of inputs of shape "
                      f"{list(x.shape)} ({type(e).__name__}: {e}; {_where(e)})")
            if not isinstance(e, (RuntimeError, ValueError, IndexError, AssertionError)):
                raise ConfigError(f"{failed}: an error of the module's own code") from None
            # torch's refusals of the inputs' shape are of these kinds: the data may be the cause
            given = f"it was given {data}, whose" if data else "the data's"
            raise ConfigError(f"{failed}; {given} inputs have shape {list(input_shape)}. If the "
                              "model expects other inputs, set the data keys for them: e.g. "
                              "data.family=digits for images [1, 8, 8], or data.family=files with "
                              "data.path for your own files (docs/configuration.md lists the "
                              "families)") from None
        if not isinstance(out, Tensor) or out.shape != (3, num_outputs):
            shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ConfigError(f"model.name: {self.name} maps inputs {list(x.shape)} to {shape}; "
                              f"the data needs [batch, {num_outputs}] outputs")
        changed = [k for k, v in before.items() if not torch.equal(v, self._buffers[k])]
        if changed:
            raise ConfigError(f"model.name: {self.name} changes its buffers {changed} in forward; "
                              "fedmaml runs the module as a pure function (buffers are constants, "
                              "BatchNorm uses batch statistics): keep state in parameters")

    def _probe_inputs(self, params: Params, x: Tensor) -> Tensor:
        """Run the stages one by one and note whether any changes its input in place (torch's
        version counter): such a module then gets copies, so it cannot alter the client's data
        or the cached output of a frozen prefix."""
        h = x
        for i in range(self.num_groups if self.staged else 1):
            version = h._version
            out = self.forward(params, h, i, i + 1) if self.staged else self.forward(params, h)
            self.copies_inputs = self.copies_inputs or h._version != version
            h = out
        return h

    def vmap_problem(self, input_shape: Sequence[int]) -> str | None:
        """Why ``torch.func.vmap`` cannot batch this module across clients (None: it can)."""
        params = self._own_params()
        stacked = {k: torch.stack([v, v]) for k, v in params.items()}
        x = torch.randn(2, 3, *input_shape, generator=torch.Generator().manual_seed(0))
        if self.copies_inputs:
            return ("its forward changes its input tensor in place; batched, that input may be "
                    "shared by the clients of a cohort")
        try:
            torch.func.vmap(self.forward)(stacked, x)  # clients' params and data batched
            torch.func.vmap(self.forward, in_dims=(0, None))(stacked, x[0])  # shared data
        except Exception as e:  # noqa: BLE001 - the reason is reported to the user
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None


def module_model(spec: ModelConfig, input_shape: Sequence[int] | None, num_outputs: int | None,
                 source: ModelSource | None = None, data: str | None = None) -> ModuleModel:
    """The model of ``spec`` (the config's ``model`` section) whose ``name`` is a user's module;
    ``data`` names the data the shapes come from, for error messages."""
    name = spec.name
    source = load_source(name) if source is None else source
    kwargs = parse_mapping("model.kwargs", spec.kwargs)
    groups = parse_mapping("model.groups", spec.groups)

    def reinit(seed: int) -> nn.Module:
        return build_module(source, kwargs, input_shape, num_outputs, seed, name)

    module = build_module(source, kwargs, input_shape, num_outputs, 0, name)
    model = ModuleModel(module, name, groups,
                        reinit=None if isinstance(source, nn.Module) else reinit)
    if input_shape is not None and num_outputs is not None:
        model.check(input_shape, num_outputs, data)
    return model


def describe_groups(model: Any) -> str:
    """A table of a model's layer groups and parameter counts, for writing a pattern."""
    params = model.init(0)
    lines = [f"{model.name}: {model.num_groups} layer groups, input side first"
             + ("" if getattr(model, "staged", True) else
                " (runs whole: no prefix caching, see docs/custom.md)"),
             f"{'#':>3}  {'group':<24}{'parameters':>12}  tensors"]
    for i, (g, names) in enumerate(zip(model.group_names, model.group_params)):
        count = sum(params[n].numel() for n in names)
        lines.append(f"{i:>3}  {g:<24}{count:>12}  {', '.join(names)}")
    total = sum(v.numel() for v in params.values())
    lines.append(f"     {'total':<24}{total:>12}")
    lines.append("pattern: one bit per group in this order, e.g. head-only: "
                 + "0" * (model.num_groups - 1) + "1")
    return "\n".join(lines)


def canonical_mapping(value: Mapping[str, Any]) -> str:
    """A mapping as the text a config keeps (JSON keeps the order: groups are input side first)."""
    return json.dumps(dict(value))
