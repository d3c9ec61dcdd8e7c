"""The DeepSpeed configuration a job gives: completed from the job, contradictions refused by name."""
import pytest

from facekd.distributed.engine import deepspeed_config
from facekd.errors import ConfigError


def _config(user, **job):
    return deepspeed_config(user, **{"micro_batch": 128, "world_size": 8, "clip_grad_norm": 5.0, **job})


def test_the_job_fills_in_batch_sizes_and_clipping_and_the_rest_passes_through():
    config = _config({"zero_optimization": {"stage": 1}, "communication_data_type": "bf16"})
    assert config["train_micro_batch_size_per_gpu"] == 128 and config["train_batch_size"] == 1024
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 5.0
    assert config["zero_optimization"] == {"stage": 1} and config["communication_data_type"] == "bf16"
    # agreeing values are accepted as they are
    assert _config({"train_batch_size": 1024, "gradient_clipping": 5.0})["train_batch_size"] == 1024


@pytest.mark.parametrize("user,message", [
    ({"train_micro_batch_size_per_gpu": 64}, "deepspeed.train_micro_batch_size_per_gpu is 64 but train.batch_size gives 128"),
    ({"train_batch_size": 512}, "deepspeed.train_batch_size is 512 but train.batch_size x 8 ranks gives 1024"),
    ({"gradient_clipping": 1.0}, "deepspeed.gradient_clipping is 1.0 but optim.clip_grad_norm gives 5.0"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4"),
    ({"optimizer": {"type": "Adam"}}, "deepspeed.optimizer is set, but the job's optim section drives it"),
    ({"scheduler": {"type": "WarmupLR"}}, "deepspeed.scheduler is set"),
    ({"bf16": {"enabled": True}}, "deepspeed.bf16 casts the backbone's weights"),
    ({"fp16": {"enabled": True}}, "deepspeed.fp16 casts the backbone's weights"),
])
def test_contradictions_name_both_sides(user, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _config(user)
