"""Evaluation: top-k over padded batches (label -1 ignored), reduced across ranks, and the 21K->1K map."""
import os

import pytest
import torch
import torch.distributed as dist

from pretrain.config import load_config
from pretrain.engine import eval_class_index, evaluate
from pretrain.metrics import topk_correct


@pytest.fixture(scope="module")
def world1():
    """A 1-process gloo group; the rendezvous variables are removed again (subprocesses started later,
    e.g. sbatch jobs, must not inherit them)."""
    from engine_utils import free_port

    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_topk_ignores_padding():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4]])
    assert topk_correct(logits, torch.tensor([1, 2, -1]), ks=(1, 2)) == [1, 1]
    assert topk_correct(logits, torch.tensor([-1, -1, -1])) == [0, 0]


def test_21k_model_evaluates_on_1k_through_the_synset_map(world1):
    from data.labels import load_label_space, map_21k_to_1k

    cfg = load_config(None, ["train.max_steps=1", "eval.label_map=21k-to-1k"])
    space21k, space1k = load_label_space("in22k-ms"), load_label_space("in1k")
    index = eval_class_index(cfg, {"name": space21k.name, "synsets": space21k.synsets}, {"name": "in1k"})
    assert index.tolist() == map_21k_to_1k(space21k, space1k) and len(index) == 1000

    class Fixed21k(torch.nn.Module):
        """'Predicts' 21K logits whose argmax is the 21K row of the true 1K class (or a wrong row)."""
        def forward(self, x):
            logits = torch.zeros(x.shape[0], len(space21k))
            for i, v in enumerate(x[:, 0, 0, 0].long().tolist()):
                logits[i, v] = 1.0
            return logits

    labels_1k = torch.tensor([0, 5, 999, 7])
    rows = [index[0].item(), index[5].item(), index[999].item(), 0 if index[7].item() != 0 else 1]
    images = torch.tensor(rows, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    loader = [(images[:3], labels_1k[:3]), (torch.cat([images[3:], images[:1]]), torch.tensor([7, -1]))]
    res = evaluate(Fixed21k(), loader, torch.device("cpu"), torch.float32, index)
    assert res["eval/samples"] == 4
    assert res["eval/top1"] == pytest.approx(75.0)


def test_21k_map_that_is_not_the_identity(world1):
    """A 21K head in fall11's sorted-WNID order (plus the one 1K synset fall11 lacks, as a user-provided
    synset file would add it): the 1K classes sit at scattered rows, so top-1 is right only if the map is
    applied."""
    from data.labels import load_label_space

    synsets = load_label_space("in21k-fall11").synsets + ["n04399382"]
    cfg = load_config(None, ["train.max_steps=1", "eval.label_map=21k-to-1k"])
    index = eval_class_index(cfg, {"name": "fall11+1", "synsets": synsets}, {"name": "in1k"})
    in1k = load_label_space("in1k").synsets
    assert [synsets[r] for r in index.tolist()] == in1k
    assert sum(r != c for c, r in enumerate(index.tolist())) > 990  # almost every class moves

    class Fixed21k(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], len(synsets))
            logits[torch.arange(x.shape[0]), x[:, 0, 0, 0].long()] = 1.0
            return logits

    labels = torch.tensor([3, 500, 998, 999, 42])
    rows = index[labels].clone()
    rows[-1] = index[41]  # one wrong prediction
    images = rows.float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    mapped = evaluate(Fixed21k(), [(images, labels)], torch.device("cpu"), torch.float32, index)
    assert mapped["eval/top1"] == pytest.approx(80.0)
    unmapped = evaluate(Fixed21k(), [(images, labels)], torch.device("cpu"), torch.float32, None)
    assert unmapped["eval/top1"] == 0.0


def test_no_map_means_identity():
    cfg = load_config(None, ["train.max_steps=1"])
    assert eval_class_index(cfg, None, None) is None


def test_fall11_lacks_a_1k_synset_and_says_which():
    from data.labels import UnknownSynsetError

    cfg = load_config(None, ["train.max_steps=1", "eval.label_map=21k-to-1k"])
    with pytest.raises(UnknownSynsetError, match="n04399382"):
        eval_class_index(cfg, {"name": "in21k-fall11"}, {"name": "in1k"})
