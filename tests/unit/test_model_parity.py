"""Our forward pass against transformers' on random Llama/Qwen2 configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tlt.models import load_model, save_model
from tlt.models.loader import hf_state_dict

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _reference(model_dir, dtype):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_and_hidden_states_match_transformers(hf_model_dir, dtype):
    ours = load_model(hf_model_dir, dtype=dtype)
    ref = _reference(hf_model_dir, dtype)
    ids = torch.randint(0, ours.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    layers = ours.config.num_hidden_layers
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        got = ours(ids, hidden_layers=range(layers + 1))
    scale = expected.logits.float().abs().max().item()
    assert (got.logits.float() - expected.logits.float()).abs().max().item() <= TOLERANCE[dtype] * max(scale, 1.0)
    for j in range(layers + 1):
        h_scale = expected.hidden_states[j].float().abs().max().item()
        diff = (got.hidden[j].float() - expected.hidden_states[j].float()).abs().max().item()
        assert diff <= TOLERANCE[dtype] * max(h_scale, 1.0), f"hidden state {j}"


def test_incremental_cached_forward_matches_full_forward(hf_model_dir):
    model = load_model(hf_model_dir, dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(num_slots=4, max_len=64)
        # Rows live in slots 2 and 3; feed 17 tokens, then 1, then the remaining 12.
        first = model(ids[:, :17], cache=cache, slot_offset=2, cache_lens=torch.tensor([0, 0]))
        one = model(ids[:, 17:18], cache=cache, slot_offset=2, cache_lens=torch.tensor([17, 17]))
        rest = model(ids[:, 18:], cache=cache, slot_offset=2, cache_lens=torch.tensor([18, 18]))
    stitched = torch.cat([first.logits, one.logits, rest.logits], dim=1)
    torch.testing.assert_close(stitched, full, atol=1e-4, rtol=1e-4)


def test_ragged_rows_with_right_padding(hf_model_dir):
    model = load_model(hf_model_dir, dtype="float32")
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, model.config.vocab_size, (1, 9), generator=g)
    b = torch.randint(0, model.config.vocab_size, (1, 4), generator=g)
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0], padded[1, :4] = a[0], b[0]
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        out = model(padded, cache=cache, cache_lens=torch.tensor([0, 0]), last_index=torch.tensor([8, 3]))
        torch.testing.assert_close(out.logits[0], model(a).logits[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.logits[1], model(b).logits[0, -1], atol=1e-4, rtol=1e-4)
        # Row 1 continues from its true length; the padding it wrote must stay invisible.
        nxt = torch.tensor([[5], [7]])
        step = model(nxt, cache=cache, cache_lens=torch.tensor([9, 4]))
        torch.testing.assert_close(step.logits[1, 0], model(torch.cat([b, nxt[1:]], 1)).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)


def test_tree_block_mask_equals_separate_branches(hf_model_dir):
    """Two sibling drafts verified in one forward give the logits of each branch run alone."""
    model = load_model(hf_model_dir, dtype="float32")
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, model.config.vocab_size, (1, 12), generator=g)
    root, left, right = 11, 22, 33
    n = prefix.shape[1]
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        model(prefix, cache=cache, cache_lens=torch.tensor([0]))
        block = torch.tensor([[root, left, right]])
        positions = torch.tensor([[n, n + 1, n + 1]])
        tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
        out = model(block, positions, cache=cache, cache_lens=torch.tensor([n]), block_mask=tree).logits
        for idx, leaf in ((1, left), (2, right)):
            alone = model(torch.cat([prefix, torch.tensor([[root, leaf]])], 1)).logits[0, -1]
            torch.testing.assert_close(out[0, idx], alone, atol=1e-4, rtol=1e-4)


def test_save_and_reload_roundtrip(hf_model_dir, tmp_path):
    model = load_model(hf_model_dir, dtype="float32")
    save_model(model, tmp_path / "copy")
    again = load_model(tmp_path / "copy", dtype="float32")
    for name, tensor in hf_state_dict(model).items():
        torch.testing.assert_close(hf_state_dict(again)[name], tensor, atol=0, rtol=0)
    ref = _reference(tmp_path / "copy", torch.float32)  # transformers reads what we wrote
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
