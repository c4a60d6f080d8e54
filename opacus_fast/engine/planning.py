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


def plan_sites(model: nn.Module) -> list[Site]:
    """Decide how every trainable parameter is captured, or raise naming what cannot be handled exactly."""
    sites: list[Site] = []
    problems: list[str] = []
    refused: set[int] = set()  # modules inside a refused one: reported with it
    for name, module in model.named_modules():
        if id(module) in refused:
            continue
        reason = refusals.module_refusal(module)
        if reason:
            problems.append(f"{describe(name, module)} {reason}")
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
                problems.append(f"{describe(name, module)}: {reason}")
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
        full = ", ".join(f"{name}.{n}" if name else n for n in own)
        problems.append(f"{describe(name, module)} {refusals.own_and_child_params(full)}")
    for site in sites:
        if site.method in vars(site.module):
            problems.append(f"{site.describe()} {refusals.instance_method(site.method)}")
    if problems:
        raise UnsupportedModuleError("opacus_fast cannot clip this model exactly:\n- " + "\n- ".join(problems))
    return sites
