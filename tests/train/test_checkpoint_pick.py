"""Resume picks the newest COMPLETE Trainer checkpoint (issue 12, item 5).

Checkpoints come from a real ``transformers.Trainer`` run on a tiny module; the cut-off save
is made by deleting what a kill mid-save would not have written yet.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import Trainer, TrainingArguments

from mmart.train.common import last_checkpoint


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.w(x).squeeze(-1), y)}


def _trainer(out, steps: int) -> Trainer:
    torch.manual_seed(0)
    data = [{"x": torch.randn(2), "y": torch.randn(())} for _ in range(16)]
    args = TrainingArguments(output_dir=str(out / "checkpoints"), max_steps=steps, save_steps=2, per_device_train_batch_size=2,
                             use_cpu=True, report_to="none", save_total_limit=None, disable_tqdm=True, logging_steps=100,
                             dataloader_num_workers=0, seed=0)
    return Trainer(model=Tiny(), args=args, train_dataset=data)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage")
    _trainer(out, 4).train()
    return out


def test_cut_off_and_empty_checkpoints_are_skipped(run, tmp_path, capsys):
    out = tmp_path / "stage"
    shutil.copytree(run, out)
    ck = out / "checkpoints"
    assert last_checkpoint(out) == str(ck / "checkpoint-4")
    (ck / "checkpoint-4" / "trainer_state.json").unlink()  # killed before the last file of the save
    (ck / "checkpoint-4" / "optimizer.pt").unlink()
    (ck / "checkpoint-6").mkdir()  # killed right after the folder was made
    assert last_checkpoint(out) == str(ck / "checkpoint-2")
    said = capsys.readouterr().out
    assert "checkpoint-6" in said and "checkpoint-4" in said and "incomplete" in said
    _trainer(out, 4).train(resume_from_checkpoint=last_checkpoint(out))  # transformers resumes from it


def test_truncated_trainer_state_is_incomplete(run, tmp_path):
    out = tmp_path / "stage"
    shutil.copytree(run, out)
    state = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    assert last_checkpoint(out) == str(out / "checkpoints" / "checkpoint-2")


def test_no_complete_checkpoint_means_start_over(tmp_path):
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    assert last_checkpoint(tmp_path) is None
