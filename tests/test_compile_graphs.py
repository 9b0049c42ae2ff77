"""``torch.compile`` captures each family's training forward as one graph, with no graph break and no
Dynamo warning (``torch._dynamo.explain``: tracing only, no code generation, seconds per model).

A graph break would split the compiled step and run Python between the pieces; a warning such as
"Dynamo ignores the lru_cache wrapper" means a cached builder (ViL's chunk gather indices) is traced into
the graph and rebuilt in every layer and step.
"""
from __future__ import annotations

import pytest
import timm
import torch

import models  # noqa: F401
from models.bench import dynamo_graphs

FAMILY_SMALL = ["vil_tiny_rpb_224", "msg_transformer_tiny_224", "scalable_vit_small_224", "restv2_tiny_224",
                "ms_mlp_tiny_224"]


@pytest.mark.parametrize("name", FAMILY_SMALL)
def test_training_forward_is_one_graph(name):
    kw = {"img_size": 96} if name.startswith("vil_") else {}
    model = timm.create_model(name, num_classes=10, drop_path_rate=0.1, **kw).train()
    found = dynamo_graphs(model, torch.randn(2, 3, 96, 96))
    assert (found["graphs"], found["graph_breaks"], found["dynamo_warnings"]) == (1, 0, []), found
    if name.startswith("vil_"):
        # the sliding-chunk layout (gather indices, key mask) enters as the attention modules' buffers:
        # no index arithmetic (arange) is traced into the graph
        nodes = list(found["graph_modules"][0].graph.nodes)
        assert not [n for n in nodes if "arange" in str(n.target)]
        local = [m for m in model.modules() if hasattr(m, "chunk_k_idx")]
        assert local and sum(n.op == "placeholder" and "chunk_k_idx" in n.name for n in nodes) == len(local)

