"""Ray Train DDP: two CPU workers follow one worker's loss trajectory for the same global batch."""

import pytest
import ray

from chimera.checkpoint import load_model
from chimera.config import ChimeraConfig
from chimera.tokenizer import train_char
from cluster.ray.train import pretrain_on_ray
from trainers.corpus import CorpusSpec, iter_documents
from trainers.fit import FitSettings
from trainers.pretrain import PretrainPlan, pretrain
from trainers.recipe import TrainHparams
from trainers.store import prepare_store

CORPUS = CorpusSpec("stories", stories_bytes=30_000, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tokenizer = train_char(iter_documents(CORPUS))
    return prepare_store(CORPUS, tokenizer, tmp_path_factory.mktemp("s") / "store")[0]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_workers_match_one_worker(store, tmp_path, local_ray):
    config = ChimeraConfig(vocab_size=store.vocab_size, d_model=32, n_layers=2, n_heads=2,
                           n_kv_heads=1, window_size=16, max_seq_len=64)
    plan = PretrainPlan(config, TrainHparams(batch_size=8, seq_len=32, eval_batches=2),
                        FitSettings(steps=12, eval_every=6), seed=1)
    _, single = pretrain(plan, store)
    steps, history = pretrain_on_ray(plan, store.root, tmp_path / "model", tmp_path / "ckpt",
                                     workers=2)
    assert steps == 12
    one = [loss for _, loss, _ in single.history.train]
    two = [loss for _, loss, _ in history.train]
    assert len(two) == 12 and one[-1] < one[0] - 0.3
    assert two == pytest.approx(one, rel=1e-4, abs=1e-4)
    assert [v for _, v in history.val] == pytest.approx([v for _, v in single.history.val],
                                                       rel=1e-4)
    assert load_model(tmp_path / "model").config == config  # rank 0 wrote the model
