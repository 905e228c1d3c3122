import torch

from slimc.bench import model_fingerprint
from conftest import tiny_model


def test_dense_export_cache_key_follows_the_weights_not_the_path():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_model(seed=0, intermediate_size=64))
