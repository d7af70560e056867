"""Document boundaries (chimera.documents): with a document token, a packed window computes each
of its documents exactly as if that document were alone, in training and in decoding."""

import dataclasses

import pytest
import torch

import chimera.recurrent
import chimera.rglru
from chimera.config import ChimeraConfig
from chimera.documents import find_documents
from chimera.model import Chimera
from chimera.rglru import RGLRU, rg_lru, rg_lru_reference

EOT = 0


def _model(recurrence_ratio: int, window: int, fused: bool, monkeypatch) -> Chimera:
    if not fused:  # the eager Functions (where no C++ toolchain is, both runs take them)
        monkeypatch.setattr(chimera.rglru, "fused_kernels_apply", lambda *t: False)
        monkeypatch.setattr(chimera.recurrent, "fused_kernels_apply", lambda *t: False)
    torch.manual_seed(0)
    config = ChimeraConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                           recurrence_ratio=recurrence_ratio, window_size=window, max_seq_len=64,
                           document_token=EOT)
    return Chimera(config).eval()


def _packed():
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 40, (1, n), generator=generator) for n in (11, 20, 4)]
    eot = torch.full((1, 1), EOT)
    # A window that starts inside a document, then two whole documents after end-of-text.
    return docs, torch.cat([docs[0], eot, docs[1], eot, docs[2]], dim=1)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("recurrence_ratio,window", [(1, 64), (1, 8), (0, 8), (100, 64)])
def test_each_packed_document_is_computed_as_if_alone(recurrence_ratio, window, fused,
                                                      monkeypatch):
    model = _model(recurrence_ratio, window, fused, monkeypatch)
    docs, packed = _packed()
    eot = torch.full((1, 1), EOT)
    with torch.no_grad():
        logits, _ = model(packed)
        alone = [model(docs[0])[0], model(torch.cat([eot, docs[1]], 1))[0],
                 model(torch.cat([eot, docs[2]], 1))[0]]
        torch.testing.assert_close(logits[:, :11], alone[0])
        torch.testing.assert_close(logits[:, 11:32], alone[1])
        torch.testing.assert_close(logits[:, 32:], alone[2])
        # and it is the document token that makes it so: without it, documents see each other
        mixing = Chimera(dataclasses.replace(model.config, document_token=None)).eval()
        mixing.load_state_dict(model.state_dict())
        assert not torch.allclose(mixing(packed)[0][:, 11:32], alone[1], atol=1e-4)


@pytest.mark.parametrize("recurrence_ratio,window", [(1, 64), (1, 8)])
@pytest.mark.parametrize("chunks", [(37,), (5, 1, 9, 22), (1,) * 37])
def test_decoding_across_documents_equals_the_whole_sequence(recurrence_ratio, window, chunks,
                                                             monkeypatch):
    model = _model(recurrence_ratio, window, True, monkeypatch)
    _, packed = _packed()
    with torch.no_grad():
        whole, _ = model(packed)
        cache, pieces, start = model.init_cache(1), [], 0
        for size in chunks:  # prefill, chunked prefill and one token at a time
            logits, cache = model(packed[:, start:start + size], cache)
            pieces.append(logits)
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-5)
    assert cache.document_start.tolist() == [32]  # the last document began there


def test_rg_lru_resets_match_the_reference_in_values_and_gradients():
    torch.manual_seed(0)
    layer = RGLRU(16, 4)
    u = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    reset = torch.rand(2, 30, generator=torch.Generator().manual_seed(2)) < 0.2
    reset[:, 0] = True
    layer = layer.double()
    outputs = []
    for fn in (rg_lru, rg_lru_reference):
        h = fn(u, layer.gates(u), layer.a_logit, h0, reset)
        outputs.append([h, *torch.autograd.grad(h.square().sum(), (u, h0, layer.a_logit))])
    for got, want in zip(*outputs, strict=True):
        torch.testing.assert_close(got, want)
    # a reset at position 0 cuts the initial state off entirely
    assert outputs[0][2].abs().max() == 0


def test_find_documents_layout():
    tokens = torch.tensor([[5, 0, 3, 4, 0, 2], [1, 2, 3, 4, 5, 6]])
    documents = find_documents(tokens, 0)
    assert documents.first.tolist() == [[0, 1, 1, 1, 4, 4], [0] * 6]
    assert documents.offsets.tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert find_documents(tokens[1:], 0) is None  # no document starts: the plain paths
    assert find_documents(tokens, None) is None
    carried = find_documents(tokens[1:], 0, position=10, carried=torch.tensor([7]))
    assert carried.first.tolist() == [[7] * 6] and carried.offsets[0, 0] == 3


def test_document_token_must_be_in_the_vocabulary():
    with pytest.raises(ValueError, match="document_token"):
        ChimeraConfig(vocab_size=40, document_token=40)
    assert ChimeraConfig.from_dict({"vocab_size": 40}).document_token is None  # old configs
