"""The vectorised tree acceptance agrees with a plain walk down the tree, and uniform streams read ahead safely."""

from __future__ import annotations

import pytest
import torch

from tlt.rollout.sampling import UniformStream
from tlt.rollout.speculative import DraftTree, SpeculativeDecoder, accept_tree


def _random_tree(rows: int, generator: torch.Generator, vocab: int = 6, num_verify: int = 7, depth: int = 3,
                 topk: int = 2) -> DraftTree:
    """A draft tree as the decoder builds them: ``depth`` levels of ``topk`` children under the ``topk`` best
    nodes, the ``num_verify-1`` best nodes kept (sibling tokens distinct)."""
    root = torch.randint(vocab, (rows,), generator=generator)
    tokens, scores, parents = [], [], []
    front_ids = torch.arange(1, topk + 1)[None].expand(rows, -1)
    first = torch.stack([torch.randperm(vocab, generator=generator)[:topk] for _ in range(rows)])
    tokens.append(first)
    scores.append(-torch.rand(rows, topk, generator=generator))
    parents.append(torch.zeros(rows, topk, dtype=torch.long))
    front_scores = scores[0]
    next_id = topk + 1
    for _ in range(1, depth):
        child = torch.stack([torch.randperm(vocab, generator=generator)[:topk] for _ in range(rows * topk)])
        child_scores = (front_scores[:, :, None] - torch.rand(rows, topk, topk, generator=generator)).reshape(rows, -1)
        tokens.append(child.reshape(rows, -1))
        scores.append(child_scores)
        parents.append(front_ids.repeat_interleave(topk, dim=1))
        best_scores, best = child_scores.topk(topk, dim=-1)
        front_ids, front_scores = next_id + best, best_scores
        next_id += topk * topk
    tree_tokens, tree_parents, tree_depth, mask, closed = SpeculativeDecoder._select(
        root, torch.cat(tokens, 1), torch.cat(scores, 1), torch.cat(parents, 1), num_verify, depth)
    assert bool(closed)
    return DraftTree(tree_tokens, tree_parents, tree_depth, mask, depth)


def _walk(tree: DraftTree, row: int, drawn: torch.Tensor) -> tuple[list[int], list[int]]:
    """Reference: descend from the root while a child carries the node's draw; returns (path, emitted tokens)."""
    parents = tree.parents[row].tolist()
    tokens = tree.tokens[row].tolist()
    node, path = 0, [0]
    while True:
        x = int(drawn[row, node])
        child = next((c for c in range(1, len(parents)) if parents[c] == node and tokens[c] == x), None)
        if child is None:
            return path, [tokens[c] for c in path[1:]] + [x]
        node = child
        path.append(node)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_acceptance_equals_the_walk(seed):
    g = torch.Generator().manual_seed(seed)
    tree = _random_tree(16, g, depth=2 + seed % 3, num_verify=4 + seed)
    # Draws that often match a child, so that paths of every length occur.
    drawn = torch.where(torch.rand(tree.tokens.shape, generator=g) < 0.7,
                        tree.tokens.roll(-1, dims=1), torch.randint(6, tree.tokens.shape, generator=g))
    accepted = accept_tree(tree, drawn)
    lengths_seen = set()
    for row in range(16):
        path, emitted = _walk(tree, row, drawn)
        n = int(accepted.lengths[row])
        lengths_seen.add(n)
        assert accepted.paths[row, :n].tolist() == path
        assert accepted.tokens[row, :n].tolist() == emitted
    assert len(lengths_seen) > 1


def test_tree_depth_and_ancestor_mask_follow_the_parents():
    tree = _random_tree(8, torch.Generator().manual_seed(1), num_verify=9, depth=4)
    for row in range(8):
        parents = tree.parents[row].tolist()
        for node in range(len(parents)):
            ancestors, a = {node}, node
            while a != 0:
                a = parents[a]
                ancestors.add(a)
            assert set(torch.nonzero(tree.mask[row, node]).flatten().tolist()) == ancestors
            assert int(tree.depth[row, node]) == len(ancestors) - 1


def test_uniform_stream_reads_ahead_without_changing_the_sequence():
    """Past several of the stream's read-ahead blocks, with peeks longer than a block now and then."""
    n = 5 * UniformStream.BLOCK
    plain = torch.Generator().manual_seed(7)
    expected = [float(torch.rand((), generator=plain)) for _ in range(n)]
    stream, got = UniformStream(7), []
    g = torch.Generator().manual_seed(0)
    while len(got) < n:
        longest = UniformStream.BLOCK + 9 if int(torch.randint(0, 8, (), generator=g)) == 0 else 9
        ahead = stream.peek(int(torch.randint(1, longest, (), generator=g)))
        used = int(torch.randint(1, len(ahead) + 1, (), generator=g))
        got.extend(ahead[:used])
        stream.consume(used)
        got.append(stream.take())
    assert got[:n] == expected


def test_uniform_stream_refuses_to_consume_what_was_not_peeked():
    stream = UniformStream(7)
    stream.peek(3)
    stream.consume(2)
    with pytest.raises(ValueError, match="passes the"):
        stream.consume(UniformStream.BLOCK)


def test_selection_flags_a_choice_that_is_not_ancestor_closed():
    """Drafted scores fall along a path (a child's score adds a log-prob to its parent's), so the best nodes form
    a tree; were a child to outrank its parent, ``_select`` says so (the decoder then raises)."""
    root = torch.tensor([7])
    tokens, scores, parents = torch.tensor([[3, 4]]), torch.tensor([[-5.0, -1.0]]), torch.tensor([[0, 1]])
    assert not bool(SpeculativeDecoder._select(root, tokens, scores, parents, num_verify=2, max_depth=2)[-1])
    assert bool(SpeculativeDecoder._select(root, tokens, torch.tensor([[-1.0, -5.0]]), parents, num_verify=2,
                                           max_depth=2)[-1])
