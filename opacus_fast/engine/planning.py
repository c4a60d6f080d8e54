"""Planning: how each trainable parameter is captured, decided once at attaching, with every part that cannot be
handled exactly collected into one error.

A parameter of a layer with a rule (``grad_sample/``) is captured where its layer is called: the layer's
``forward`` is replaced by a capture. Every trainable parameter also has a *parameter site*: wherever the model
uses it directly (a class token, a layer scale, ``F.linear(x, self.weight)``), the batch tracker collects its
per-example gradient there (see :mod:`opacus_fast.engine.tracking`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..grad_sample import LayerRule, find_rule
from . import refusals
from .refusals import UnsupportedModuleError, describe


@dataclass(eq=False)
class Site:
    """Where parameters are captured: a rule layer's calls (``rule`` set), or one parameter's direct uses."""

    module: object
    module_name: str
    params: dict[str, nn.Parameter]
    rule: LayerRule | None = None

    def describe(self) -> str:
        """How errors name this site: ``'name' (Type)`` for a module."""
        return describe(self.module_name, self.module) if isinstance(self.module, nn.Module) else self.module_name


class FunctionalLayer:
    """A functional layer call (``F.linear``, ``F.embedding``) with its weight and options as attributes, in the
    shape of the layer module its rule expects."""

    def __init__(self, kind: str, **attrs: object) -> None:
        self.kind = kind
        self.__dict__.update(attrs)


@dataclass
class Plan:
    """The rule layers whose calls are captured, and a site for every trainable parameter (by ``id``)."""

    layers: list[Site] = field(default_factory=list)
    params: dict[int, Site] = field(default_factory=dict)


def own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module``'s own trainable parameters, less aliases of its children's (e.g. Opacus' DPLSTM registers its
    cells' weights under nn.LSTM's names): those are captured where they are used, in the child."""
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if own:
        children = {id(p) for child in module.children() for p in child.parameters()}
        own = {n: p for n, p in own.items() if id(p) not in children}
    return own


def plan_sites(model: nn.Module) -> Plan:
    """Decide how every trainable parameter is captured, or raise naming what cannot be handled exactly."""
    plan = Plan()
    problems: list[tuple[str, str, str]] = []  # (module type, module name, reason)
    refused: set[int] = set()  # modules inside a refused one: reported with it
    for name, module in model.named_modules():
        if id(module) in refused:
            continue
        reason = refusals.module_refusal(module)
        if reason:
            problems.append((type(module).__name__, name, reason))
            refused.update(id(m) for m in module.modules())
            continue
        own = own_trainable(module)
        for pname, p in own.items():
            if id(p) not in plan.params:
                plan.params[id(p)] = Site(module, f"{name}.{pname}" if name else pname, {pname: p})
        rule = find_rule(module) if own else None
        if rule is None:
            continue
        unknown = sorted(set(own) - set(rule.params))
        reason = rule.validate(module) or (refusals.unknown_params(unknown) if unknown else None)
        if reason:
            problems.append((type(module).__name__, name, reason))
        elif "forward" in vars(module):
            problems.append((type(module).__name__, name, refusals.instance_method("forward")))
        else:
            plan.layers.append(Site(module, name, own, rule))
    if problems:
        raise UnsupportedModuleError(refusals.model_refused(problems))
    return plan
