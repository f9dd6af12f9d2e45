"""Request + rules + live stats -> RoutePlan.

A RoutePlan is the ordered list of candidates (deployment, provider) the
forwarding loop walks, plus, for every deployment it did not pick, the reason.
The router is pure: the caller passes in the live facts (which providers have
a key, breaker state, latency and success ratio) through the ``LiveView``
protocol, so the same code answers a real request and ``cb-proxy explain``.

Resolution (docs/rules.md): the first matching route rewrites the requested
model and adds its fallbacks; the resulting name is a model, an alias or a
virtual model. Its deployments (a virtual model's: those of its candidates,
or of every chat model, i.e. every model that rates its quality, when it
lists none) are the primary candidates. The strategy orders them; then come
the request's own ``fallback_models``, the virtual model's, the route's and
the defaults', each deployment once, each group ordered by its own virtual
model's strategy or else the plan's. The orders themselves are in
proxy.core.strategies.

Drops, before any ordering: no key; a context window smaller than the
estimated prompt (characters / 4); over a constraint. A cost cap passes a
deployment whose input and output prices per 1k are both at most the cap; a
latency cap one whose live p95 (its prior until measured) is at most the cap,
and no deployment whose latency is unknown. Constraints (the request's, else
the virtual model's) bind the primary candidates and the fallbacks from the
rules, so a budget is never broken silently; the fallbacks the request names
itself are exempt: a client that sets a cap and names fallbacks has said what
it accepts beyond the cap. When the drops leave nothing, a 400 lists every
deployment with its reason (all "no key": an empty plan, and the forwarding
loop answers 503).

The task type is the request's, else the virtual model's, else detected from
the messages (proxy.core.tasks), and detection runs only when the ordering needs
it: ``task_specific`` or ``balanced`` over more than one model (a model's
deployments share its quality ratings).

Invariants:
- The plan's order is honest about the first choice: a deployment whose
  breaker is open keeps its place (ordered as if healthy) and is listed in
  ``blocked``; the forwarding loop skips it without I/O, so ``x-cb-fallback``
  says when the strategy's first choice did not serve.
- A deployment appears at most once in ``candidates``; every deployment
  considered and not there has exactly one Rejection.
- Deterministic: the same rules, request and live facts give the same plan.
- Live facts are per deployment (its breaker, docs/breaker.md "Keys"), so the
  router asks the LiveView once per deployment per request.
- Lookup tables are compiled once per RuleSet (``_compiled``); a request does
  dictionary lookups, filters over precomputed tuples and, only when the live
  facts changed, a sort (orders are memoised per pool: proxy.core.strategies).
  Success ratios are compared at 0.1 % resolution (``SUCCESS_DECIMALS``) so
  that a steady trickle of calls does not defeat the memo.
- Rejection reasons are formatted only when read (``RoutePlan.rejected``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.config.model import (
    MODEL_ENDPOINTS,
    TASK_TYPES,
    CostCap,
    Model,
    Route,
    RuleSet,
    TaskType,
    VirtualModel,
    Weights,
)
from proxy.core.candidates import Candidate, LiveView, UpstreamStats
from proxy.core.errors import InvalidRequest, ModelNotFound
from proxy.core.prefs import RequestPrefs
from proxy.core.strategies import (
    UNKNOWN_LATENCY,
    Pool,
    Ranker,
)

VIRTUAL_PREFIX = "cb:"  # names in this namespace are virtual models (404 lists only those)
COMPILED_CACHE_SIZE = 2  # RuleSets whose tables are kept: the current one and the one before
UNRATED_QUALITY = 0.0
SUCCESS_DECIMALS = 3  # success ratios are compared at 0.1 % resolution
HEADER_SAFE = frozenset(map(chr, range(0x20, 0x7F)))

_NO_STATS: Mapping[str, UpstreamStats] = MappingProxyType({})


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, slots=True)
class Rejection:
    deployment: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoutePlan:
    requested: str
    resolved: str  # the model (its canonical name, not an alias) or virtual model after routes
    strategy: str
    candidates: tuple[Candidate, ...]
    drops: tuple[_Drop, ...] = ()  # what the filters dropped; see ``rejected``
    reason: str = ""  # why the first candidate is first, short
    task_type: str | None = None
    blocked: tuple[Candidate, ...] = field(default=())  # candidates whose breaker is open now
    task_source: str = ""  # "request" | "virtual model" | "detected" | "" (not needed)
    # candidates[:primary_count] are the strategy's order; the rest are fallbacks.
    primary_count: int = 0
    scores: tuple[float, ...] = ()  # balanced scores of the primary candidates, in order
    # The live facts per deployment the plan was made with (empty on the one-deployment path).
    stats: Mapping[str, UpstreamStats] = field(default_factory=lambda: _NO_STATS)
    prompt_tokens: int = 0
    max_cost: CostCap | None = None
    max_latency_ms: float | None = None
    # Request fallbacks skipped (unknown, or not serving the endpoint): ``x-cb-warning``.
    warnings: tuple[str, ...] = ()
    # The route that matched and the virtual model resolved to, if any: their per-request
    # settings (hedging, continuation) apply to the attempts.
    route: Route | None = None
    virtual: VirtualModel | None = None

    @property
    def rejected(self) -> tuple[Rejection, ...]:
        """Every deployment considered and not in the plan, with why (built on demand)."""
        return _rejections(self.drops, self.candidates)

    def header(self) -> str:
        """The short ``x-cb-route`` value: strategy, task, choice and why; ASCII only."""
        first = self.candidates[0].deployment.key if self.candidates else "-"
        parts = [f"strategy={self.strategy}"]
        if self.task_type:
            parts.append(f"task={self.task_type}")
        parts.append(f"chose={first}")
        if self.reason:
            parts.append(f"reason={self.reason}")
        if self.resolved != self.requested:
            parts.append(f"rewrote={self.requested}->{self.resolved}")
        text = "; ".join(parts)
        if text.isascii() and text.isprintable():
            return text
        return "".join(c if c in HEADER_SAFE else "?" for c in text)


# --------------------------------------------------------------------------- compiled tables


@dataclass(frozen=True, slots=True)
class _Target:
    name: str
    virtual: VirtualModel | None
    pool: Pool
    # endpoint -> indices of the pool whose model does not serve it (models.*.endpoints);
    # an endpoint every deployment serves is absent.
    unfit: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def _unfit(pool: Pool, rules: RuleSet) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for endpoint in MODEL_ENDPOINTS:
        idx = tuple(
            i
            for i, cand in enumerate(pool.cands)
            if not rules.models[cand.deployment.model].serves(endpoint)
        )
        if idx:
            out[endpoint] = idx
    return out


def _pool(models: Sequence[Model], rules: RuleSet, cache: dict[str, Candidate]) -> Pool:
    cands: list[Candidate] = []
    for model in models:
        for dep in model.deployments:
            cand = cache.get(dep.key)
            if cand is None:
                provider = rules.providers[dep.provider]
                window = dep.context_window or model.context_window
                cand = cache[dep.key] = Candidate(dep, provider, window, model.quality)
            cands.append(cand)
    deps = [c.deployment for c in cands]
    # Live facts are per deployment, as its breaker is (docs/breaker.md, 'Keys'): one
    # overloaded model must not make its provider's other models look slow or failing.
    units = list(dict.fromkeys(d.key for d in deps))
    reps = {k: next(c for c in cands if c.deployment.key == k) for k in units}
    quality: dict[str | None, tuple[float, ...]] = {
        t: tuple(c.quality.get(t, UNRATED_QUALITY) for c in cands) for t in TASK_TYPES
    }
    quality[None] = tuple(
        sum(c.quality.values()) / len(c.quality) if c.quality else UNRATED_QUALITY for c in cands
    )
    windows = tuple(
        math.inf if c.context_window is None else float(c.context_window) for c in cands
    )
    return Pool(
        cands=tuple(cands),
        keys=tuple(d.key for d in deps),
        ins=tuple(d.input_cost_per_1k for d in deps),
        outs=tuple(d.output_cost_per_1k for d in deps),
        prices=tuple(d.input_cost_per_1k + d.output_cost_per_1k for d in deps),
        priors=tuple(UNKNOWN_LATENCY if d.latency_ms is None else d.latency_ms for d in deps),
        windows=windows,
        quality=quality,
        providers=tuple(units),
        reps=tuple(reps.values()),
        pidx=tuple(units.index(d.key) for d in deps),
        models=len({d.model for d in deps}),
        min_window=min(windows, default=math.inf),
        everything=tuple(range(len(cands))),
    )


def _compile(rules: RuleSet) -> dict[str, _Target]:
    cache: dict[str, Candidate] = {}
    targets: dict[str, _Target] = {}
    for name, model in rules.models.items():
        pool = _pool([model], rules, cache)
        targets[name] = _Target(name, None, pool, _unfit(pool, rules))
    for alias, canonical in rules.model_index.items():
        targets.setdefault(alias, targets[canonical])
    # A virtual model without candidates takes every chat model: embedding models
    # rate no quality, so "rates its quality" is what tells them apart.
    rated = [m for m in rules.models.values() if m.quality]
    chat_models = rated or list(rules.models.values())
    for name, virtual in rules.virtual_models.items():
        if virtual.candidates is None:
            models = chat_models
        else:
            models = [rules.models[n] for n in virtual.candidates if n in rules.models]
        pool = _pool(models, rules, cache)
        targets[name] = _Target(name, virtual, pool, _unfit(pool, rules))
    return targets


_COMPILED: dict[int, tuple[RuleSet, dict[str, _Target]]] = {}


def _compiled(rules: RuleSet) -> dict[str, _Target]:
    """The tables of ``rules``, built on first use.

    Keyed by id(); the entry keeps the RuleSet alive, so the id cannot be
    reused while the entry exists (RuleSet has slots and no __weakref__).
    """
    hit = _COMPILED.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit[1]
    targets = _compile(rules)
    while len(_COMPILED) >= COMPILED_CACHE_SIZE:
        del _COMPILED[next(iter(_COMPILED))]
    _COMPILED[id(rules)] = (rules, targets)
    return targets


# --------------------------------------------------------------------------- errors


def unknown_model_error(rules: RuleSet, name: str) -> ModelNotFound:
    virtual = sorted(rules.virtual_models)
    if name.startswith(VIRTUAL_PREFIX):
        return ModelNotFound(
            f"The virtual model '{name}' does not exist in the proxy's rules. "
            f"Virtual models: {', '.join(virtual) or 'none'}.",
            param="model",
        )
    known = sorted(rules.model_index)
    return ModelNotFound(
        f"The model '{name}' does not exist in the proxy's rules. "
        f"Models: {', '.join(known) or 'none'}. Virtual models: {', '.join(virtual) or 'none'}.",
        param="model",
    )


ENDPOINT_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


def wrong_endpoint_error(model: Model, endpoint: str) -> InvalidRequest:
    """A concrete model asked for on an endpoint it does not serve (models.*.endpoints)."""
    serves = ", ".join(ENDPOINT_PATHS.get(e, e) for e in model.endpoints)
    return InvalidRequest(
        f"The model '{model.name}' does not serve {ENDPOINT_PATHS.get(endpoint, endpoint)}; "
        f"it serves {serves}.",
        param="model",
        code="model_not_supported",
    )


def _over_constrained(name: str, rejected: Sequence[Rejection]) -> InvalidRequest:
    reasons = "; ".join(f"{r.deployment}: {r.reason}" for r in rejected)
    context_only = all(r.reason.startswith(("no key", "context window")) for r in rejected) and any(
        r.reason.startswith("context window") for r in rejected
    )
    return InvalidRequest(
        f"no deployment of '{name}' can serve this request: {reasons}",
        param="model",
        code="context_length_exceeded" if context_only else "no_candidates",
    )


def format_usd(value: float) -> str:
    """A price as people write it: ``$0.000075``, never ``$7.5e-05``."""
    if value == math.inf:
        return "$inf"
    text = f"{value:.8f}".rstrip("0").rstrip(".")
    return f"${text or '0'}"


def _cost_violation(price_in: float, price_out: float, cap: CostCap) -> str:
    over = []
    if price_in > cap.input:
        over.append(f"input {format_usd(price_in)}/1k over cap {format_usd(cap.input)}")
    if price_out > cap.output:
        over.append(f"output {format_usd(price_out)}/1k over cap {format_usd(cap.output)}")
    return ", ".join(over)


def _latency_violation(live: float | None, prior: float, cap: float) -> str:
    if live is not None:
        return f"p95 {live:.0f}ms over cap {cap:g}ms"
    if prior == UNKNOWN_LATENCY:
        return f"latency unknown (no prior, not measured), cap {cap:g}ms"
    return f"prior latency {prior:g}ms over cap {cap:g}ms"


# --------------------------------------------------------------------------- drops

NO_KEY = "no key"
ENDPOINT = "endpoint"
CONTEXT = "context window"
COST = "cost"
LATENCY = "latency"


@dataclass(frozen=True, slots=True)
class _Drop:
    """Deployments of one pool that one filter dropped, with what the reason text needs."""

    kind: str
    pool: Pool
    indices: tuple[int, ...]
    limit: object = None  # prompt tokens, the CostCap or the latency cap
    measured: tuple[float | None, ...] = ()  # live latency per deployment of the pool

    def rejections(self) -> Iterator[Rejection]:
        pool = self.pool
        for i in self.indices:
            yield Rejection(pool.keys[i], self._reason(i))

    def _reason(self, i: int) -> str:
        pool, limit = self.pool, self.limit
        if self.kind == NO_KEY:
            return f"no key ({pool.cands[i].provider.api_key_env} unset)"
        if self.kind == ENDPOINT:
            return f"does not serve {ENDPOINT_PATHS.get(str(limit), limit)}"
        if self.kind == CONTEXT:
            return f"context window {pool.windows[i]:.0f} < estimated prompt {limit} tokens"
        if isinstance(limit, CostCap):
            return _cost_violation(pool.ins[i], pool.outs[i], limit)
        if isinstance(limit, float):
            return _latency_violation(self.measured[pool.pidx[i]], pool.priors[i], limit)
        return self.kind


def _serving(
    target: _Target, idx: Sequence[int], endpoint: str | None, drops: list[_Drop]
) -> Sequence[int]:
    """``idx`` without the deployments whose model does not serve ``endpoint`` (recorded)."""
    unfit = target.unfit.get(endpoint) if endpoint else None
    if not unfit:
        return idx
    out = set(unfit)
    dropped = tuple(i for i in idx if i in out)
    if not dropped:
        return idx
    drops.append(_Drop(ENDPOINT, target.pool, dropped, endpoint))
    return [i for i in idx if i not in out]


def _missing(idx: Sequence[int], keep: Sequence[int]) -> tuple[int, ...]:
    kept = set(keep)
    return tuple(i for i in idx if i not in kept)


def _rejections(drops: Sequence[_Drop], planned: Sequence[Candidate]) -> tuple[Rejection, ...]:
    """One Rejection per dropped deployment that is not in the plan after all (an exempt
    fallback can bring back what a constraint dropped), with its first reason."""
    in_plan = {c.deployment.key for c in planned}
    out: dict[str, Rejection] = {}
    for drop in drops:
        for rejection in drop.rejections():
            if rejection.deployment not in in_plan:
                out.setdefault(rejection.deployment, rejection)
    return tuple(out.values())


class _Planner(Ranker):
    """One request's planning: live facts memoised per deployment, then the filters."""

    __slots__ = ("live",)

    def __init__(
        self,
        live: LiveView,
        prefs: RequestPrefs,
        virtual: VirtualModel | None,
        messages: Sequence[Mapping[str, object]],
        weights: Weights,
    ) -> None:
        task: TaskType | None = prefs.task_type or (virtual.task_type if virtual else None)
        source = "request" if prefs.task_type else "virtual model" if task is not None else ""
        super().__init__(task, source, messages, weights)
        self.live = live

    def upstreams(self, pool: Pool) -> Sequence[UpstreamStats]:
        """The live facts of each deployment of ``pool`` (in ``pool.providers`` order).

        Memoised on the pool for as long as the LiveView's ``epoch`` stays the same: asking
        every deployment of a 50-model catalog on every request would cost more than the
        rest of the planning together.
        """
        live = self.live
        epoch = live.epoch()
        memo = pool.live
        if memo and memo[0][0] is live and memo[0][1] == epoch:
            ups: Sequence[UpstreamStats] = memo[0][2]
        else:
            ups = tuple([self.ask(rep) for rep in pool.reps])
            memo[:] = [(live, epoch, ups)]
        self.stats.update(zip(pool.providers, ups, strict=True))
        return ups

    def ask(self, cand: Candidate) -> UpstreamStats:
        live, dep = self.live, cand.deployment
        if not live.has_key(cand.provider):
            return UpstreamStats(False, False)
        ratio = live.success_ratio(dep)
        if ratio is not None:
            # 0.1 % steps: under steady traffic the ratio moves with every call,
            # and a finer value would only defeat the order memo.
            ratio = round(ratio, SUCCESS_DECIMALS)
        return UpstreamStats(True, live.is_blocked(dep), live.latency_ms(dep), ratio)

    def eligible(
        self,
        pool: Pool,
        prompt_tokens: int,
        cost_cap: CostCap | None,
        latency_cap: float | None,
        drops: list[_Drop],
    ) -> Sequence[int]:
        """Indices of the pool's deployments that can serve, in declaration order.

        What a filter drops is recorded once per filter (a _Drop), and turned
        into text only if someone reads ``RoutePlan.rejected``.
        """
        ups = self.upstreams(pool)
        idx: Sequence[int] = pool.everything
        if not all(u.available for u in ups):
            usable = [u.available for u in ups]
            pidx = pool.pidx
            idx = [i for i in idx if usable[pidx[i]]]
            drops.append(
                _Drop(NO_KEY, pool, tuple(i for i in pool.everything if not usable[pidx[i]]))
            )
        elif cost_cap is None and latency_cap is None and prompt_tokens <= pool.min_window:
            return idx
        if prompt_tokens > pool.min_window:
            windows = pool.windows
            keep = [i for i in idx if windows[i] >= prompt_tokens]
            if len(keep) < len(idx):
                drops.append(_Drop(CONTEXT, pool, _missing(idx, keep), prompt_tokens))
            idx = keep
        if cost_cap is not None:
            ins, outs, cap_in, cap_out = pool.ins, pool.outs, cost_cap.input, cost_cap.output
            keep = [i for i in idx if ins[i] <= cap_in and outs[i] <= cap_out]
            if len(keep) < len(idx):
                drops.append(_Drop(COST, pool, _missing(idx, keep), cost_cap))
            idx = keep
        if latency_cap is not None:
            lat = self.latencies(pool, idx)
            keep = [i for i, ms in zip(idx, lat, strict=True) if ms <= latency_cap]
            if len(keep) < len(idx):
                measured = tuple(u.latency_ms for u in ups)
                drops.append(_Drop(LATENCY, pool, _missing(idx, keep), latency_cap, measured))
            idx = keep
        return idx


# --------------------------------------------------------------------------- plan_route


def _rewritten(rules: RuleSet, name: str, headers: Mapping[str, str]) -> str:
    """A request fallback after the routes, as the requested model would be."""
    if not rules.routes:
        return name
    route = rules.match_route(name, headers)
    return name if route is None or route.rewrite_model is None else route.rewrite_model


def plan_route(
    rules: RuleSet,
    requested: str,
    headers: Mapping[str, str],
    prefs: RequestPrefs,
    live: LiveView,
    *,
    messages: Sequence[Mapping[str, object]] = (),
    prompt_tokens: int = 0,
    endpoint: str | None = None,
) -> RoutePlan:
    """Resolve a request's model into an ordered candidate list (see the module docstring).

    ``endpoint`` (``chat``, ``completions``, ``embeddings``; None = not checked) keeps
    out every deployment whose model does not serve it. Raises ModelNotFound (404) for
    an unknown name, InvalidRequest (400) for a model that does not serve the endpoint
    or when the drops leave no candidate. A request fallback that is unknown or serves
    no deployment for the endpoint is skipped, with a warning in ``warnings``.
    """
    targets = _compiled(rules)
    route = rules.match_route(requested, headers) if rules.routes else None
    name = requested
    route_fallbacks: tuple[str, ...] = ()
    if route is not None:
        if route.rewrite_model is not None:
            name = route.rewrite_model
        route_fallbacks = route.fallbacks
    target = targets.get(name)
    if target is None:
        raise unknown_model_error(rules, name)
    virtual = target.virtual
    pool = target.pool
    unfit = target.unfit.get(endpoint) if endpoint else None
    if unfit and virtual is None and len(unfit) == len(pool.cands):
        raise wrong_endpoint_error(rules.models[target.name], str(endpoint))
    strategy: str = prefs.routing_strategy or (
        virtual.strategy if virtual is not None else rules.defaults.strategy
    )
    cost_cap = prefs.max_cost or (virtual.max_cost_per_1k_tokens if virtual else None)
    latency_cap = prefs.max_latency_ms or (virtual.max_latency_ms if virtual else None)
    rule_fallbacks = (
        (virtual.fallback_models if virtual is not None else ())
        + route_fallbacks
        + rules.defaults.fallback_models
    )

    # The common case: one deployment, nothing to order, no constraint to check.
    if (
        len(pool.cands) == 1
        and not prefs.fallback_models
        and not rule_fallbacks
        and cost_cap is None
        and latency_cap is None
        and prompt_tokens <= pool.min_window
        and live.has_key(pool.cands[0].provider)
        and not unfit
    ):
        return RoutePlan(
            requested=requested,
            resolved=target.name,
            strategy=strategy,
            candidates=pool.cands,
            reason="as requested" if virtual is None else "only candidate",
            task_type=prefs.task_type or (virtual.task_type if virtual else None),
            task_source=(
                "request"
                if prefs.task_type
                else "virtual model"
                if virtual is not None and virtual.task_type
                else ""
            ),
            blocked=pool.cands if live.is_blocked(pool.cands[0].deployment) else (),
            primary_count=1,
            prompt_tokens=prompt_tokens,
            route=route,
            virtual=virtual,
        )

    planner = _Planner(live, prefs, virtual, messages, rules.defaults.weights)
    drops: list[_Drop] = []
    primary = planner.ordered(
        strategy,
        pool,
        _serving(
            target,
            planner.eligible(pool, prompt_tokens, cost_cap, latency_cap, drops),
            endpoint,
            drops,
        ),
    )
    reason = primary.reason
    if primary.cands and len(pool.cands) == 1 and virtual is None:
        reason = "as requested"
    candidates: Sequence[Candidate] = primary.cands
    primary_count = len(candidates)
    warnings: list[str] = []

    if prefs.fallback_models or rule_fallbacks:
        candidates = list(candidates)
        seen = set(primary.keys)
        # The request's own fallbacks are exempt from the constraints (module docstring).
        for group, binding in ((prefs.fallback_models, False), (rule_fallbacks, True)):
            for fallback in group:
                fb = targets.get(_rewritten(rules, fallback, headers) if not binding else fallback)
                if fb is None:
                    # A client's unknown fallback costs it that fallback, not the request.
                    warnings.append(
                        f"fallback model '{fallback}' does not exist in the proxy's rules; skipped"
                    )
                    continue
                fb_pool = fb.pool
                fb_unfit = fb.unfit.get(endpoint) if endpoint else None
                if fb_unfit and len(fb_unfit) == len(fb_pool.cands):
                    if not binding:
                        path = ENDPOINT_PATHS.get(str(endpoint), endpoint)
                        warnings.append(
                            f"fallback model '{fallback}' does not serve {path}; skipped"
                        )
                    continue
                fb_idx = _serving(
                    fb,
                    planner.eligible(
                        fb_pool,
                        prompt_tokens,
                        cost_cap if binding else None,
                        latency_cap if binding else None,
                        drops,
                    ),
                    endpoint,
                    drops,
                )
                fresh: Sequence[int] = [i for i in fb_idx if fb_pool.keys[i] not in seen]
                if not fresh:
                    continue
                if len(fresh) == len(fb_pool.cands):
                    fresh = fb_pool.everything  # so that the ordering can be memoised
                fb_strategy = fb.virtual.strategy if fb.virtual is not None else strategy
                group_order = planner.ordered(fb_strategy, fb_pool, fresh)
                candidates.extend(group_order.cands)
                seen.update(group_order.keys)
        if not primary_count and candidates:
            reason = "no primary candidate left; fallback"

    if not candidates and drops and not all(d.kind == NO_KEY for d in drops):
        raise _over_constrained(name, _rejections(drops, ()))
    stats = planner.stats
    blocked: tuple[Candidate, ...] = ()
    if any(s.blocked for s in stats.values()):
        blocked = tuple(c for c in candidates if stats[c.deployment.key].blocked)
        if blocked and candidates[0] is blocked[0]:
            reason += ", breaker open"
    return RoutePlan(
        requested=requested,
        resolved=target.name,
        strategy=strategy,
        candidates=tuple(candidates),
        drops=tuple(drops),
        reason=reason,
        task_type=planner.task,
        blocked=blocked,
        task_source=planner.task_source,
        primary_count=primary_count,
        scores=primary.scores,
        stats=stats,
        prompt_tokens=prompt_tokens,
        max_cost=cost_cap,
        max_latency_ms=latency_cap,
        warnings=tuple(warnings),
        route=route,
        virtual=virtual,
    )
