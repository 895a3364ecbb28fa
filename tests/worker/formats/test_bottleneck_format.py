"""The bottleneck files without a model: written and read back, and checked against a served base's shape."""

from __future__ import annotations

import pytest
import torch

from worker.formats.bottleneck import (
    BottleneckConfig,
    BottleneckFormatError,
    read_bottleneck,
    read_bottleneck_folder,
    write_bottleneck_folder,
)
from worker.formats.files import AdapterLoadError

CONFIG = BottleneckConfig(bottleneck_size=4, placement=("mlp",), activation="relu", scaling=2.0, hidden_size=8,
                          num_layers=2)


def _tensors(config: BottleneckConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) for name, shape in config.expected_shapes().items()}


def test_written_folders_read_back_for_training_and_for_serving(tmp_path):
    tensors = _tensors(CONFIG)
    write_bottleneck_folder(tmp_path, CONFIG, tensors)
    config, read = read_bottleneck_folder(tmp_path)
    assert config == CONFIG and all(torch.equal(read[name], tensor) for name, tensor in tensors.items())
    served = read_bottleneck(tmp_path, hidden_size=8, num_layers=2)
    assert set(served.blocks) == {(0, "mlp"), (1, "mlp")} and served.activation == "relu" and served.scaling == 2.0
    assert torch.equal(served.blocks[1, "mlp"].up_bias, tensors["layers.1.mlp.up.bias"])
    with pytest.raises(AdapterLoadError, match="this base has 16 and 2"):
        read_bottleneck(tmp_path, hidden_size=16, num_layers=2)


def test_invalid_configs_are_refused():
    with pytest.raises(BottleneckFormatError, match="bottleneck_size must be a positive integer"):
        BottleneckConfig(bottleneck_size=0, placement=("mlp",), activation="relu", scaling=1.0, hidden_size=8,
                         num_layers=2)
    with pytest.raises(BottleneckFormatError, match="not a bottleneck adapter config"):
        BottleneckConfig.from_json({**CONFIG.to_json(), "format": "other/v1"})
