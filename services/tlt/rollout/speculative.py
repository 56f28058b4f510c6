"""Tree speculative decoding with an EAGLE-3 drafter and lossless verification.

One iteration for a batch of running sequences:

1. **Catch up** the drafter: feed it every ``(target feature, next token)`` pair it has not seen yet
   (features of tokens decoded without speculation accumulate lazily, so switching SD on costs one
   drafter prefill, not a target re-prefill). Its output at the last token is the tree root's state.
2. **Draft a tree** (EAGLE-2 style dynamic tree): ``depth`` drafter steps; each step expands the
   ``topk`` best frontier nodes by ``topk`` children, scored by cumulative draft log-probability.
   The ``num_verify - 1`` best nodes (ancestor-closed) plus the root form the verification tree.
3. **Verify** the whole tree in one target forward with a tree attention mask.
4. **Accept** from the root down by recursive rejection sampling of the node's children, which are
   deterministic draft proposals (point masses), against the target distribution ``p`` (after
   temperature / top-k / top-p); see :func:`accept_tree`. Every emitted token follows ``p``
   exactly (lossless), and seeded outputs equal those of plain sampling. For greedy rows it reduces
   to "descend while a child equals the argmax".
5. **Commit**: the accepted path's K/V entries are moved to consecutive cache positions; the rest of
   the tree's entries are simply left beyond the sequence length and overwritten later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tlt.models.drafter import Eagle3Drafter
from tlt.models.kv_cache import StaticKVCache
from tlt.models.transformer import CausalLM, ForwardOutput
from tlt.rollout.sampling import processed_probs, sample_from_probs, token_logprobs
from tlt.rollout.tuner import SpecStrategy


@dataclass
class SpecDecodeStats:
    """Counters in vLLM's spec-decode vocabulary (drafts = verification passes, per sequence)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    sd_seconds: float = 0.0
    plain_seconds: float = 0.0
    sd_iterations: int = 0
    plain_iterations: int = 0
    # decode iterations by batch-size bucket (its lower bound, as in the tuner's bucket_bounds)
    sd_iterations_by_bucket: dict[int, int] = field(default_factory=dict)
    plain_iterations_by_bucket: dict[int, int] = field(default_factory=dict)

    @property
    def acceptance_length(self) -> float:
        """Mean tokens emitted per verification (accepted drafts + the bonus token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def record_accepts(self, accepted: int) -> None:
        while len(self.accepted_per_position) < accepted:
            self.accepted_per_position.append(0)
        for pos in range(accepted):
            self.accepted_per_position[pos] += 1

    def count_iteration(self, sd: bool, seconds: float, bucket: int) -> None:
        """Count one decode iteration that took ``seconds``, with SD on or off, in batch-size ``bucket``."""
        if sd:
            self.sd_seconds += seconds
            self.sd_iterations += 1
            self.sd_iterations_by_bucket[bucket] = self.sd_iterations_by_bucket.get(bucket, 0) + 1
        else:
            self.plain_seconds += seconds
            self.plain_iterations += 1
            self.plain_iterations_by_bucket[bucket] = self.plain_iterations_by_bucket.get(bucket, 0) + 1

    def as_dict(self) -> dict[str, float | int | list[int] | dict[str, int]]:
        return {
            "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens, "acceptance_length": self.acceptance_length,
            "accepted_per_position": list(self.accepted_per_position), "sd_seconds": self.sd_seconds,
            "plain_seconds": self.plain_seconds, "sd_iterations": self.sd_iterations,
            "plain_iterations": self.plain_iterations,
            "sd_iterations_by_bucket": {str(b): n for b, n in sorted(self.sd_iterations_by_bucket.items())},
            "plain_iterations_by_bucket": {str(b): n for b, n in sorted(self.plain_iterations_by_bucket.items())},
        }


@dataclass
class DraftTree:
    """A verification tree per row; node 0 is the root (the last generated, not yet cached token).

    Nodes are in creation order, so a node's parent comes before it."""

    tokens: torch.Tensor  # [B, N] target token ids
    parents: torch.Tensor  # [B, N] parent node of each node (the root is its own parent)
    depth: torch.Tensor  # [B, N]
    mask: torch.Tensor  # [B, N, N] ancestor-or-self
    max_depth: int


@dataclass
class RowResult:
    """What one sequence gets from an iteration: emitted tokens, their log-probs, accepted drafts."""

    tokens: list[int]
    logprobs: list[float]
    accepted: int


@dataclass
class Acceptance:
    """The verified outcome for a batch: per row, the accepted path of tree nodes (root first), whose
    length is the number of emitted tokens, and the emitted tokens (the accepted drafts, then the bonus)."""

    paths: torch.Tensor  # [B, max_depth + 1] tree nodes; entries past a row's length are padding
    lengths: torch.Tensor  # [B]
    tokens: torch.Tensor  # [B, max_depth + 1]; entries past a row's length are padding
    last: torch.Tensor  # [B] the node where each path ends (its draw is the bonus token)


class SpecState:
    """Per-sequence drafter bookkeeping kept by the engine.

    ``pending`` holds target features (concatenated aux hidden states) for target positions
    ``drafter_len .. cache_len-1`` that the drafter has not consumed yet.
    """

    __slots__ = ("drafter_len", "pending")

    def __init__(self) -> None:
        self.drafter_len = 0
        self.pending: list[torch.Tensor] = []


def accept_tree(tree: DraftTree, drawn: torch.Tensor) -> Acceptance:
    """Recursive rejection sampling down each row's tree of point-mass proposals, for all rows at once.

    ``drawn[b, n]`` is the target's draw at node ``n``: its argmax for a greedy row, else
    ``F_p^{-1}(u_d)``, the inverse CDF of the node's target distribution ``p`` at the row's uniform for the
    node's depth ``d``. At a node with children ``c_1..c_m`` (deterministic proposals), rejection sampling
    accepts ``c_1`` with probability ``p(c_1)``, else ``c_2`` with probability ``p(c_2) / (1 - p(c_1))``, ...,
    else draws the bonus token from the residual ``p`` without the children. Inverse-CDF coupling realises
    that chain with one uniform: accept the child equal to ``x = F_p^{-1}(u)`` if there is one, otherwise
    ``x`` *is* the residual draw (given that it is no child, ``x`` follows ``p`` restricted to the
    non-children). The law is the same, and every emitted token uses exactly one uniform of the request's
    stream, in order, as plain sampling does: seeded outputs are identical with and without speculation.
    For a greedy row this is "descend while a child carries the argmax".

    Vectorised: a node is on the accepted path when it and each of its ancestors below the root carries its
    parent's draw. Siblings carry distinct tokens, so those nodes form one chain from the root.
    """
    hit = tree.tokens == drawn.gather(1, tree.parents)
    hit[:, 0] = True
    on_path = ~(tree.mask & ~hit[:, None, :]).any(-1)  # [B, N]
    lengths = on_path.sum(1)
    b, n = tree.tokens.shape
    width = tree.max_depth + 1
    # Path nodes by depth; nodes off the path go to a spare column that is cut off.
    column = torch.where(on_path, tree.depth, width)
    paths = torch.zeros(b, width + 1, dtype=torch.long, device=tree.tokens.device)
    paths.scatter_(1, column, torch.arange(n, device=paths.device)[None].expand(b, -1))
    paths = paths[:, :width]
    last = paths.gather(1, (lengths - 1)[:, None])
    tokens = torch.cat([tree.tokens.gather(1, paths[:, 1:]), torch.zeros_like(last)], dim=1)
    tokens.scatter_(1, (lengths - 1)[:, None], drawn.gather(1, last))
    return Acceptance(paths, lengths, tokens, last.squeeze(1))


def residual_tokens(probs: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """The bonus tokens of sampled rows at the node where their path ended (every child there rejected).

    ``drawn`` [R] was drawn from ``probs`` [R, V] and is none of the node's children, so it already follows
    the residual distribution ``max(p - sum of rejected point masses, 0)`` normalised; it is returned as is.
    (Drawing afresh from ``probs`` here is the classic bug that biases towards drafted tokens.)
    """
    return drawn


def _last_query_mask(last_cols: torch.Tensor, key_len: int) -> torch.Tensor:
    """``[B, 1, 1, key_len]``: the one query of each row (at cache column ``last_cols[b]``) sees the columns up
    to its own."""
    return (torch.arange(key_len, device=last_cols.device)[None, :] <= last_cols[:, None])[:, None, None, :]


def _distinct_contiguous_args(fn: Callable) -> Callable:
    """``fn`` with its positional tensors contiguous and distinct: a compiled function guards on strides and
    aliasing, and the drafter gets expanded (stride-0) views and one tensor twice in some calls, each of which
    would otherwise compile a graph of its own."""
    def call(*args: Any, **kwargs: Any) -> Any:
        seen: set[int] = set()
        passed = []
        for arg in args:
            if isinstance(arg, torch.Tensor):
                arg = arg.contiguous()
                if id(arg) in seen:
                    arg = arg.clone()
                seen.add(id(arg))
            passed.append(arg)
        return fn(*passed, **kwargs)
    return call


def _compiled(fn: Callable) -> Callable:
    """``torch.compile`` with dynamic shapes, called with contiguous, distinct tensors."""
    return _distinct_contiguous_args(torch.compile(fn, dynamic=True))


def _allow_graphs_per_function(count: int) -> None:
    """Let dynamo keep at least ``count`` graphs per compiled function before it gives up and runs one eagerly.
    Its limit (``recompile_limit``, 8) is process-wide; vLLM raises it the same way for its own graphs."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, count)


class SpeculativeDecoder:
    """Drafts, verifies and commits speculative tokens for the engine's running sequences."""

    def __init__(self, target: CausalLM, drafter: Eagle3Drafter, target_cache: StaticKVCache,
                 num_slots: int, max_len: int, target_forward: Callable[..., ForwardOutput] | None = None,
                 compile: bool = False, num_strategies: int = 1) -> None:
        """``target_forward``: the target's forward to verify with (the engine's, compiled or not; default
        ``target.forward``); ``compile``: ``torch.compile`` (dynamic shapes) the drafter's catch-up and the tree
        expansion, whose drafter steps and tree bookkeeping then run as one graph per strategy and row-count
        class (one row, more): ``num_strategies`` says how many strategies there will be."""
        if compile:
            _allow_graphs_per_function(2 * num_strategies)
        self.target = target
        self._verify_forward = target_forward or target.forward
        self._drafter_catch_up = _compiled(drafter.forward_cached_last) if compile else drafter.forward_cached_last
        self._draft_tree = _compiled(self._expand_tree) if compile else self._expand_tree
        self.drafter = drafter
        self.target_cache = target_cache
        self.drafter_cache = drafter.new_cache(num_slots, max_len)
        self.aux_layers = drafter.config.aux_layer_ids
        self.stats = SpecDecodeStats()

    @torch.inference_mode()
    def warm_up_drafter(self) -> None:
        """Call the drafter's catch-up once per shape class a rollout can give it: 1 or more rows, 1 or more
        tokens (a catch-up after nothing was accepted is one token wide), starting at cache position 0 or later.
        Generation alone need not reach every class (a good drafter has nothing rejected in a short warm-up),
        and a compiled catch-up would then compile the missing graph mid-rollout. (The tree expansion's classes,
        a strategy at one row or more, are those the engine's warm-up generates.) Writes only scratch K/V into
        idle drafter cache slots."""
        device = self.target.device
        width = len(self.aux_layers) * self.drafter.config.target_hidden_size
        for rows in range(1, min(2, self.drafter_cache.keys[0].shape[0]) + 1):
            for tokens in (1, 2):
                for start in (0, 1):
                    starts = torch.full((rows,), start, device=device)
                    cols = starts[:, None] + torch.arange(tokens, device=device)[None, :]
                    feats = torch.zeros(rows, tokens, width, dtype=self.drafter.fc.dtype, device=device)
                    ids = torch.zeros(rows, tokens, dtype=torch.long, device=device)
                    last = torch.full((rows,), tokens - 1, device=device)
                    self._drafter_catch_up(ids, self.drafter.fuse(feats), cols, self.drafter_cache, 0, cols,
                                           start + tokens, _last_query_mask(starts + last, start + tokens), last)

    # ---- feature capture --------------------------------------------------------------------

    def capture(self, states: list[SpecState], hidden: dict[int, torch.Tensor], lengths: list[int]) -> None:
        """Store target features of a forward for later drafter catch-up ([B, T, H] per aux layer)."""
        feats = torch.cat([hidden[j] for j in self.aux_layers], dim=-1)
        for row, (state, n) in enumerate(zip(states, lengths)):
            state.pending.append(feats[row, :n])

    # ---- one speculative iteration ----------------------------------------------------------

    @torch.inference_mode()
    def step(self, seqs: list, states: list[SpecState], strategy: SpecStrategy) -> tuple[list[RowResult], float]:
        """Run catch-up, drafting, verification and commit for rows in slots ``0..len(seqs)-1``.

        ``seqs`` expose ``all_tokens``, ``cache_len``, ``params`` and ``uniforms``; their
        ``cache_len`` is advanced here. Returns the per-row results and the catch-up seconds.
        """
        start = time.perf_counter()
        h_root, logits_root = self._catch_up(seqs, states)
        catch_up_s = time.perf_counter() - start
        tree = self._draft(seqs, h_root, logits_root, strategy)
        cache_lens = torch.tensor([s.cache_len for s in seqs], device=self.target.device)
        out = self._verify_forward(
            tree.tokens, cache_lens[:, None] + tree.depth, cache=self.target_cache, cache_lens=cache_lens,
            block_mask=tree.mask, hidden_layers=self.aux_layers,
            key_len=max(s.cache_len for s in seqs) + tree.tokens.shape[1],
        )
        feats = torch.cat([out.hidden[j] for j in self.aux_layers], dim=-1)
        accepted = self._accept(seqs, tree, out.logits)
        results = self._commit(seqs, states, accepted, out.logits, feats)
        n_draft = tree.tokens.shape[1] - 1
        for r in results:
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += n_draft
            self.stats.num_accepted_tokens += r.accepted
            self.stats.record_accepts(r.accepted)
        return results, catch_up_s

    def _catch_up(self, seqs: list, states: list[SpecState]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.target.device
        counts = [len(s.all_tokens) - 1 - st.drafter_len for s, st in zip(seqs, states)]
        width = max(counts)
        b = len(seqs)
        feats = torch.zeros(b, width, len(self.aux_layers) * self.drafter.config.target_hidden_size,
                            dtype=self.drafter.fc.dtype, device=device)
        tokens = torch.zeros(b, width, dtype=torch.long, device=device)
        for row, (s, st, n) in enumerate(zip(seqs, states, counts)):
            feats[row, :n] = torch.cat(st.pending)[-n:]
            tokens[row, :n] = torch.tensor(s.all_tokens[st.drafter_len + 1:], device=device)
        starts = torch.tensor([st.drafter_len for st in states], device=device)
        cols = starts[:, None] + torch.arange(width, device=device)[None, :]
        key_len = int(starts.max()) + width
        last = torch.tensor(counts, device=device) - 1
        out = self._drafter_catch_up(tokens, self.drafter.fuse(feats), cols, self.drafter_cache, 0, cols,
                                     key_len, _last_query_mask(starts + last, key_len), last)
        for st, n in zip(states, counts):
            st.drafter_len += n
            st.pending.clear()
        return out.hidden[:, 0], out.logits[:, 0]

    def _draft(self, seqs: list, h_root: torch.Tensor, logits_root: torch.Tensor, strategy: SpecStrategy
               ) -> DraftTree:
        device = self.target.device
        cache_lens = [s.cache_len for s in seqs]  # == drafter_len after catch-up
        base = torch.tensor(cache_lens, device=device)
        root_tokens = torch.tensor([s.all_tokens[-1] for s in seqs], device=device)
        tokens, parents, depth, mask, closed = self._draft_tree(
            h_root, logits_root, base, root_tokens, self.drafter_cache, max(cache_lens), strategy.topk,
            strategy.depth, strategy.num_verify)
        if not bool(closed):
            raise RuntimeError("draft tree selection is not ancestor-closed")
        return DraftTree(tokens, parents, depth, mask, strategy.depth)

    def _expand_tree(self, h_root: torch.Tensor, logits_root: torch.Tensor, base: torch.Tensor,
                     root_tokens: torch.Tensor, drafter_cache: StaticKVCache, prefix_len: int, k: int, depth: int,
                     num_verify: int) -> tuple[torch.Tensor, ...]:
        """Tensor part of :meth:`_draft` (one compiled graph per strategy when the engine compiles): ``depth - 1``
        drafter steps from the root's state, then :meth:`_select`; returns the tree's tokens, parents, depths,
        mask and whether the selection was ancestor-closed. ``prefix_len`` is the longest row's cache length."""
        device = h_root.device
        b = h_root.shape[0]
        scratch = max(depth - 1, 0) * k
        key_len = prefix_len + scratch
        logp = torch.log_softmax(logits_root.float(), dim=-1)
        top_lp, top_ids = logp.topk(k, dim=-1)
        node_tokens = [self.drafter.to_target_ids(top_ids)]
        node_scores = [top_lp]
        node_parents = [torch.zeros(b, k, dtype=torch.long, device=device)]
        front_ids = torch.arange(1, k + 1, device=device)[None, :].expand(b, k)
        front_tokens, front_scores = node_tokens[0], top_lp
        front_hidden = h_root[:, None, :].expand(b, k, -1)
        width = max(scratch, 1)
        front_anc = torch.zeros(b, k, width, dtype=torch.bool, device=device)
        next_id = k + 1
        # Scratch K/V of draft step s's frontier sit at base + (s-1)*k .. base + s*k - 1; what each query may
        # see there changes per step, the rest of the mask does not.
        rel = torch.arange(key_len, device=device)[None, :] - base[:, None]  # [B, key_len]
        in_scratch = ((rel >= 0) & (rel < scratch))[:, None, :]
        prefix = (rel < 0)[:, None, :]
        scratch_index = rel.clamp(0, width - 1)[:, None, :].expand(-1, k, -1)
        child_parent_slot = torch.arange(k, device=device).repeat_interleave(k)[None].expand(b, -1)
        for step in range(1, depth):
            own_cols = (step - 1) * k + torch.arange(k, device=device)
            own = torch.nn.functional.one_hot(own_cols, width).bool()[None].expand(b, -1, -1)
            visible = front_anc | own
            mask = (prefix | (visible.gather(2, scratch_index) & in_scratch)).unsqueeze(1)
            positions = (base + step - 1)[:, None].expand(b, k)
            out = self.drafter.forward_cached(front_tokens, front_hidden, positions, drafter_cache, 0,
                                              base[:, None] + own_cols[None, :], key_len, mask)
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, K, Vd]
            child_lp, child_ids = logp.topk(k, dim=-1)
            child_scores = (front_scores[:, :, None] + child_lp).reshape(b, k * k)
            child_tokens = self.drafter.to_target_ids(child_ids).reshape(b, k * k)
            node_tokens.append(child_tokens)
            node_scores.append(child_scores)
            node_parents.append(front_ids.gather(1, child_parent_slot))
            best_scores, best = child_scores.topk(k, dim=-1)
            parent_slot = best // k
            front_ids = next_id + best
            front_tokens = child_tokens.gather(1, best)
            front_scores = best_scores
            front_hidden = out.hidden.gather(1, parent_slot[:, :, None].expand(-1, -1, out.hidden.shape[-1]))
            parent_own = own.gather(1, parent_slot[:, :, None].expand(-1, -1, width))
            front_anc = front_anc.gather(1, parent_slot[:, :, None].expand(-1, -1, width)) | parent_own
            next_id += k * k
        return self._select(root_tokens, torch.cat(node_tokens, 1), torch.cat(node_scores, 1),
                            torch.cat(node_parents, 1), num_verify, depth)

    @staticmethod
    def _select(root_tokens: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, parents: torch.Tensor,
                num_verify: int, max_depth: int) -> tuple[torch.Tensor, ...]:
        """Keep the ``num_verify-1`` best nodes (ancestor-closed) in creation order, plus the root: the tree's
        tokens, parents, depths and ancestor-or-self mask, and whether every kept node's parent was kept."""
        b, m = tokens.shape
        device = tokens.device
        order = torch.sort(-scores, dim=1, stable=True).indices[:, : num_verify - 1]
        chosen = order.sort(dim=1).values  # creation order: parents before children
        node_ids = chosen + 1  # node ids are 1-based (0 = root)
        inverse = torch.full((b, m + 1), -1, dtype=torch.long, device=device)
        inverse[:, 0] = 0
        inverse.scatter_(1, node_ids, torch.arange(1, num_verify, device=device)[None].expand(b, -1))
        parent_pos = inverse.gather(1, parents.gather(1, chosen))
        closed = (parent_pos >= 0).all()
        tree_parents = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=device), parent_pos.clamp(min=0)], dim=1)
        tree_tokens = torch.cat([root_tokens[:, None], tokens.gather(1, chosen)], dim=1)
        # Ancestor-or-self mask: hop to the parent max_depth times (the root is its own parent).
        hop = torch.arange(num_verify, device=device)[None].expand(b, -1)
        mask = torch.zeros(b, num_verify, num_verify, dtype=torch.bool, device=device)
        mask.scatter_(2, hop[:, :, None], True)
        for _ in range(max_depth):
            hop = tree_parents.gather(1, hop)
            mask.scatter_(2, hop[:, :, None], True)
        depth = mask.sum(-1) - 1
        return tree_tokens, tree_parents, depth, mask, closed

    def _accept(self, seqs: list, tree: DraftTree, logits: torch.Tensor) -> Acceptance:
        """The target's draw at every node (argmax, or inverse CDF at the row's uniform for the node's depth),
        then the accepted paths; sampled rows' bonus tokens go through :func:`residual_tokens`."""
        _, n, vocab = logits.shape
        drawn = logits.float().argmax(-1)
        sampled = [row for row, s in enumerate(seqs) if not s.params.greedy]
        probs = None
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            row_params = [seqs[row].params for row in sampled for _ in range(n)]
            probs = processed_probs(logits[index].reshape(-1, vocab), row_params).view(len(sampled), n, vocab)
            uniforms = torch.tensor([seqs[row].uniforms.peek(tree.max_depth + 1) for row in sampled],
                                    device=logits.device)
            at_node = uniforms.gather(1, tree.depth[index]).reshape(-1)
            drawn[index] = sample_from_probs(probs.view(-1, vocab), at_node).view(len(sampled), n)
        accepted = accept_tree(tree, drawn)
        if sampled:
            last_of = accepted.last[index]
            bonus = residual_tokens(probs[torch.arange(len(sampled)), last_of], drawn[index, last_of])
            accepted.tokens[index, accepted.lengths[index] - 1] = bonus
        return accepted

    def _commit(self, seqs: list, states: list[SpecState], accepted: Acceptance, logits: torch.Tensor,
                feats: torch.Tensor) -> list[RowResult]:
        """Move the accepted paths' K/V into place, keep their features for the drafter, consume the sampled
        rows' uniforms, and return each row's tokens with their log-probs."""
        path_logits = logits.gather(1, accepted.paths[:, :, None].expand(-1, -1, logits.shape[-1]))
        logprobs = token_logprobs(path_logits, [s.params for s in seqs], accepted.tokens).tolist()
        path_feats = feats.gather(1, accepted.paths[:, :, None].expand(-1, -1, feats.shape[-1]))
        lengths, paths, tokens = accepted.lengths.tolist(), accepted.paths.tolist(), accepted.tokens.tolist()
        moves: tuple[list[int], list[int], list[int]] = ([], [], [])  # slot, source, destination
        results = []
        for row, (s, st, n) in enumerate(zip(seqs, states, lengths)):
            for i, node in enumerate(paths[row][1:n], start=1):
                if node != i:
                    moves[0].append(row)
                    moves[1].append(s.cache_len + node)
                    moves[2].append(s.cache_len + i)
            st.pending.append(path_feats[row, :n])
            s.cache_len += n
            if not s.params.greedy:
                s.uniforms.consume(n)
            results.append(RowResult(tokens[row][:n], logprobs[row][:n], n - 1))
        if moves[0]:
            self.target_cache.copy_positions(*(torch.tensor(m, device=logits.device) for m in moves))
        return results
