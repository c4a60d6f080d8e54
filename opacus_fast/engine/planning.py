"""Planning: which trainable parameter is captured how (a layer rule, a unit, or its own leaf module), decided once
at attaching, with every part that cannot be handled exactly collected into one error."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..grad_sample import LayerRule, find_rule, find_unit
from . import refusals
from .refusals import UnsupportedModuleError, describe


@dataclass(eq=False)
class Site:
    """One captured call target: a rule layer, or a unit method, with its trainable parameters."""

    module: nn.Module
    module_name: str
    method: str
    params: dict[str, nn.Parameter]
    rule: LayerRule | None = None

    def describe(self) -> str:
        """How errors name this site: ``'name' (Type)``, plus ``.method`` for a unit other than ``forward``."""
        return describe(self.module_name, self.module)

    def describe_method(self) -> str:
        return f"{self.describe()}.{self.method}"


def own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module``'s own trainable parameters, less aliases of its children's (e.g. Opacus' DPLSTM registers its
    cells' weights under nn.LSTM's names): those are captured where they are used, in the child."""
    own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if own:
        children = {id(p) for child in module.children() for p in child.parameters()}
        own = {n: p for n, p in own.items() if id(p) not in children}
    return own


class Problems:
    """The refused modules of a model, one entry per module type and reason: a model with 49 BatchNorm layers gets
    one line that counts them and names the first few, not 49 lines."""

    SHOWN = 3  # module names listed per entry

    def __init__(self) -> None:
        self.found: dict[tuple[type, str], list[tuple[str, nn.Module]]] = {}

    def add(self, name: str, module: nn.Module, reason: str) -> None:
        """Record that ``module`` (called ``name``) is refused for ``reason`` (starting with its separator)."""
        self.found.setdefault((type(module), reason), []).append((name, module))

    def lines(self) -> list[str]:
        """``'name' (Type) reason`` for a lone module, ``Type × n ('a', 'b', 'c' and k more) reason`` otherwise."""
        out = []
        for (cls, reason), modules in self.found.items():
            if len(modules) == 1:
                out.append(describe(*modules[0]) + reason)
                continue
            names = ", ".join(f"'{name or '<root>'}'" for name, _ in modules[: self.SHOWN])
            more = f" and {len(modules) - self.SHOWN} more" if len(modules) > self.SHOWN else ""
            out.append(f"{cls.__name__} × {len(modules)} ({names}{more}){reason}")
        return out


def plan_sites(model: nn.Module) -> list[Site]:
    """Decide how every trainable parameter is captured, or raise naming what cannot be handled exactly."""
    sites: list[Site] = []
    problems = Problems()
    refused: set[int] = set()  # modules inside a refused one: reported with it
    for name, module in model.named_modules():
        if id(module) in refused:
            continue
        reason = refusals.module_refusal(module)
        if reason:
            problems.add(name, module, f" {reason}")
            refused.update(id(m) for m in module.modules())
            continue
        own = own_trainable(module)
        if not own:
            continue
        rule = find_rule(module)
        if rule is not None:
            unknown = sorted(set(own) - set(rule.params))
            reason = rule.validate(module) or (refusals.unknown_params(unknown) if unknown else None)
            if reason:
                problems.add(name, module, f": {reason}")
            else:
                sites.append(Site(module, name, "forward", own, rule))
            continue
        unit = find_unit(module)
        if unit is not None and set(own) <= set(unit.params):
            sites.append(Site(module, name, unit.method, own))
            continue
        child_params = [
            f"{name}.{n}" if name else n
            for child_name, child in module.named_children()
            for n, p in child.named_parameters(prefix=child_name)
            if p.requires_grad
        ]
        if not child_params:
            sites.append(Site(module, name, "forward", own))
            continue
        problems.add(name, module, f" {refusals.own_and_child_params(', '.join(own))}")
    for site in sites:
        if site.method in vars(site.module):
            problems.add(site.module_name, site.module, f" {refusals.instance_method(site.method)}")
    if problems.found:
        raise UnsupportedModuleError("opacus_fast cannot clip this model exactly:\n- " + "\n- ".join(problems.lines()))
    return sites
