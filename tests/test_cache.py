"""The ragged cache's attention against dense masked attention, and cache bookkeeping."""

import math

import pytest
import torch

from kvray.cache import KVRayCache, KVRayLayer, RaggedKV
from kvray.runtime import ragged_attention


def dense_masked_reference(query, keys, values, keep, tail_k, tail_v, pads=None):
    """Plain attention over [all prefix entries | tail] with evicted prefix entries masked out
    and a causal mask on the tail. query [B, Hq, q, d]; keys [B, H, N, d]; keep [B, H, N] bool;
    row b does not see its first pads[b] tail slots."""
    B, Hq, q, d = query.shape
    H = keys.shape[1]
    G = Hq // H
    T = tail_k.shape[2]
    out = torch.zeros(B, q, Hq, d, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            K = torch.cat([keys[b, h], tail_k[b, h]]).double()
            V = torch.cat([values[b, h], tail_v[b, h]]).double()
            for i in range(q):
                tail = (torch.arange(T) <= T - q + i) & (torch.arange(T) >= (pads[b] if pads else 0))
                visible = torch.cat([keep[b, h], tail])
                logits = (K @ query[b, hq, i].double()) / math.sqrt(d)
                logits[~visible] = -math.inf
                out[b, i, hq] = torch.softmax(logits, 0) @ V
    return out


@pytest.mark.parametrize("uniform", [True, False, "mixed"])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("G", [1, 3])
def test_ragged_attention_matches_dense_masked(uniform, q_len, G):
    torch.manual_seed(1)
    B, H, N, d, T = 2, 2, 13, 8, 4
    keys, values = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    if uniform == "mixed":  # row 0 has equal head counts (batched view), row 1 does not
        keep = torch.zeros(B, H, N, dtype=torch.bool)
        keep[0, 0, :5] = True
        keep[0, 1, 3:8] = True
        keep[1, 0, :9] = True
        keep[1, 1, ::4] = True
    elif uniform:
        keep = torch.zeros(B, H, N, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                keep[b, h, torch.randperm(N)[:7]] = True
    else:
        keep = torch.rand(B, H, N) < 0.5
        keep[0, 1] = False  # a head that keeps nothing
        keep[1, 0] = True   # a head that keeps everything
    indices = [keep[b, h].nonzero().flatten() for b in range(B) for h in range(H)]
    layer = KVRayLayer(prefix=RaggedKV.gather(keys, values, indices), prefix_tokens=N)
    tail_k, tail_v = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    layer.update(tail_k, tail_v)
    query = torch.randn(B, H * G, q_len, d)
    got = ragged_attention(query, layer, 1 / math.sqrt(d))
    want = dense_masked_reference(query, keys, values, keep, tail_k, tail_v)
    assert layer.prefix.uniform == (uniform is True)
    assert (layer.prefix.row(0) is not None) == (uniform in (True, "mixed"))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_bytes_held_are_the_kept_entries_only():
    B, H, N, d = 1, 3, 50, 16
    keys, values = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    indices = [torch.arange(10), torch.arange(20), torch.arange(5)]
    layer = KVRayLayer(prefix=RaggedKV.gather(keys, values, indices), prefix_tokens=N)
    cache = KVRayCache([layer])
    assert cache.nbytes() == (10 + 20 + 5) * d * 2 * 4
    assert cache.prefix_entries() == 35
    # positions are the original ones, and the sequence length counts original positions
    assert layer.prefix.positions.tolist() == list(range(10)) + list(range(20)) + list(range(5))
    assert cache.get_seq_length() == N
    layer.update(torch.randn(B, H, 2, d), torch.randn(B, H, 2, d))
    assert cache.get_seq_length() == N + 2
    assert cache.nbytes() == (35 + 2 * H) * d * 2 * 4


def test_gather_copies_so_the_full_cache_can_be_freed():
    keys, values = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    ragged = RaggedKV.gather(keys, values, [torch.tensor([1, 5])])
    keys.zero_()
    assert ragged.keys.abs().sum() > 0
    assert ragged.keys.untyped_storage().nbytes() == 2 * 4 * 4


@pytest.mark.parametrize("inference", [True, False])
def test_a_decode_step_appends_in_place(inference):
    """The tail grows inside its buffers (one token copied per step, not the whole tail), also
    under inference_mode (where views do not record their base), until the room runs out."""
    from kvray.cache import TAIL_SLACK

    layer = KVRayLayer()
    steps = [torch.randn(2, 3, 1, 4) for _ in range(TAIL_SLACK + 3)]
    with torch.inference_mode(inference):
        layer.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
        first = layer._bufs[0]
        moved = []
        for k in steps:
            layer.update(k, k)
            moved.append(layer._bufs[0] is not first)
            first = layer._bufs[0]
    assert moved.count(True) == 1  # once, when the TAIL_SLACK slots of room were used up
    assert torch.equal(layer.keys[:, :, 5:], torch.cat(steps, dim=2))


def test_row_selection_copies_when_read_and_once_for_a_chain():
    """`RaggedKV.select_rows` equals packing the kept rows' entries; the copy waits for the
    first read of the entries, and a selection of a selection copies once, from the source."""
    torch.manual_seed(0)
    B, H, d = 4, 2, 3
    lengths = (2, 5, 1, 3, 4, 4, 6, 2)
    total = sum(lengths)
    src = RaggedKV(torch.randn(total, d), torch.randn(total, d), torch.arange(total) * 10, lengths, B, H)

    def eager(x: RaggedKV, keep):
        parts = [slice(*x.row_span(b)) for b in keep]
        return [torch.cat([t[p] for p in parts]) for t in (x.keys, x.values, x.positions)]

    one = src.select_rows([3, 1])
    assert "keys" not in one.__dict__ and one.lengths == (6, 2, 1, 3) and one.batch == 2
    assert one.nbytes == 12 * 2 * d * 4  # the selected entries, before the copy
    two = one.select_rows([1])  # row 1 of the selection: the source's row 1
    assert "keys" not in one.__dict__ and two.__dict__["_pending"][0] == (src,)
    for got, want in zip((two.keys, two.values, two.positions), eager(src, [1])):
        assert torch.equal(got, want)
    for got, want in zip((one.keys, one.values, one.positions), eager(src, [3, 1])):
        assert torch.equal(got, want)
    assert "_pending" not in one.__dict__ and one.nbytes == one.keys.nbytes + one.values.nbytes
    assert one.offsets == [0, 6, 8, 9, 12] and not one.uniform
    with pytest.raises(AttributeError):
        one.no_such_attribute


def test_concatenation_copies_when_read_and_leaves_the_sources():
    """`RaggedKV.concat` (a merge) equals packing the parts one after the other, also of a lazy
    selection and of a concatenation; nothing is copied before the first read, the result is
    a copy (the sources stay as they were when it is written), and `pieces` lists the parts."""
    torch.manual_seed(1)
    d = 3

    def ragged(lengths, B, H=2):
        n = sum(lengths)
        return RaggedKV(torch.randn(n, d), torch.randn(n, d), torch.randint(0, 99, (n,)), lengths, B, H)

    a, b, c = ragged((2, 1, 3, 4), 2), ragged((5, 0), 1), ragged((1, 2, 2, 2, 0, 3), 3)
    sel = c.select_rows([2, 0])
    ab = RaggedKV.concat([a, b])
    assert "keys" not in ab.__dict__ and ab.pieces() == [(a, 0), (b, 10)]
    assert ab.nbytes == 15 * 2 * d * 4 and ab.lengths == (2, 1, 3, 4, 5, 0) and ab.batch == 3
    whole = RaggedKV.concat([ab, sel])
    assert "keys" not in whole.__dict__ and whole.__dict__["_pending"][0] == (a, b, c)
    for attr in ("keys", "values", "positions"):
        t = lambda x: getattr(x, attr)  # noqa: E731
        rows_c = torch.cat([t(c)[slice(*c.row_span(r))] for r in (2, 0)])
        assert torch.equal(t(whole), torch.cat([t(a), t(b), rows_c]))
        assert torch.equal(t(ab), torch.cat([t(a), t(b)]))
    assert whole.lengths == (2, 1, 3, 4, 5, 0, 0, 3, 1, 2) and whole.offsets[-1] == 21
    before = a.keys.clone()
    one = RaggedKV.concat([a])
    one.keys.add_(1)  # written in place (MorphKV's ring does): the source is not
    assert torch.equal(a.keys, before)
    with pytest.raises(ValueError, match="same KV heads"):
        RaggedKV.concat([a, ragged((1, 1, 1), 1, H=3)])
