"""Host input pipeline: tfds (mocked), ImageFolder trees, synthetic; splits, shards, resume."""

import dataclasses
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds
from train_utils import command_status, tiny_config
from train_utils import make_image_tree as make_tree

from cifar_flax import UserError
from cifar_flax.config import default_config
from cifar_flax.data import input_pipeline as ip

pytestmark = pytest.mark.usefixtures("fresh_caches")


def cfg(dataset, **kw):
    c = default_config()
    c.dataset = dataset
    c.update(dict(batch_size=4, eval_batch_size=4, val_fraction=0.0, seed=0))
    c.update(kw)
    return c


def image_ids(batches):
    """Ids (from the colour) of the real (unmasked) images of eval batches."""
    out = []
    for b in batches:
        keep = b["mask"] if "mask" in b else np.ones(len(b["label"]), bool)
        px = b["image"][keep][:, 0, 0].astype(int)
        out += list(px[:, 0] + 256 * px[:, 1])
    return out


TREE = {"train": {"cat": 5, "dog": 4, "ant": 6}, "test": {"cat": 2, "dog": 3, "ant": 2}}


def test_imagefolder_info_and_eval_sees_every_example_once(tmp_path):
    ids = make_tree(tmp_path, TREE)
    c = cfg(f"imagefolder:{tmp_path}", eval_batch_size=4)
    info = ip.get_info(c)
    assert info.class_names == ("ant", "cat", "dog")
    assert info.image_shape == (6, 6, 3) and info.uniform_size
    assert info.split_sizes == {"train": 15, "validation": 0, "test": 7}
    assert list(ip.eval_batches(c, info, "validation")) == []  # val_fraction=0: no validation
    for split, n in (("train", 15), ("test", 7)):
        batches = list(ip.eval_batches(c, info, split))
        assert len(batches) == -(-n // 4)  # 15 and 7 do not divide by 4: last batch padded
        assert all(b["image"].shape == (4, 6, 6, 3) and b["image"].dtype == np.uint8 for b in batches)
        assert all(b["label"].dtype == np.int32 and b["mask"].dtype == bool for b in batches)
        got = image_ids(batches)
        assert sorted(got) == sorted(i for i, (s, _) in ids.items() if s == split)
        labels = np.concatenate([b["label"][b["mask"]] for b in batches])
        names = [info.class_names[y] for y in labels]
        assert names == [ids[i][1] for i in got]


def test_tfds_path_with_mock_data():
    with tfds.testing.mock_data(num_examples=20):
        c = cfg("cifar10", val_fraction=0.25, eval_batch_size=6, batch_size=4)
        info = ip.get_info(c)
        assert info.num_classes == 10 and len(set(info.class_names)) == 10
        assert info.image_shape == (32, 32, 3)
        assert info.split_sizes == {"train": 15, "validation": 5, "test": 20}
        test = list(ip.eval_batches(c, info, "test"))
        assert len(test) == 4 and sum(b["mask"].sum() for b in test) == 20
        assert test[-1]["mask"].tolist() == [True, True, False, False, False, False]
        train = next(ip.train_batches(c, info))
        assert train["image"].shape == (4, 32, 32, 3) and train["image"].dtype == np.uint8
        assert 0 <= train["label"].min() and train["label"].max() < 10
        # Validation and train are disjoint parts of the mocked train split.
        val = np.concatenate([b["image"][b["mask"]] for b in ip.eval_batches(c, info, "validation")])
        tr = np.concatenate([b["image"][b["mask"]] for b in ip.eval_batches(c, info, "train")])
        assert len(val) == 5 and len(tr) == 15
        assert not {v.tobytes() for v in val} & {t.tobytes() for t in tr}


def test_tfds_download_failure_is_one_clear_error(monkeypatch, tmp_path):
    def fail(self, *a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])  # A host that resolves.
    with pytest.raises(UserError, match=r"download or preparation failed \(OSError: network "
                       r"unreachable\)\. .*data_dir.*imagefolder:") as e:
        ip.get_info(cfg("cifar10", data_dir=str(tmp_path)))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a tfds dataset"):
        ip.get_info(cfg("no_such_dataset_xyz"))


def test_varying_sizes_need_image_size(tmp_path):
    make_tree(tmp_path, TREE, sizes=[(6, 6), (9, 5), (4, 8)])
    with pytest.raises(UserError, match="image_size"):
        ip.get_info(cfg(f"imagefolder:{tmp_path}"))
    c = cfg(f"imagefolder:{tmp_path}", image_size=7)
    info = ip.get_info(c)
    assert info.image_shape == (7, 7, 3) and not info.uniform_size
    batches = list(ip.eval_batches(c, info, "train"))
    assert all(b["image"].shape == (4, 7, 7, 3) for b in batches)
    assert sum(b["mask"].sum() for b in batches) == 15
    assert len(set(image_ids(batches))) == 15  # constant colours survive the resize


def _corrupt(root):
    with open(f"{root}/train/cat/0.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage that is not a png")
    return f"{root}/train/cat/0.png"


def _empty(root):
    open(f"{root}/train/dog/0.png", "wb").close()
    return f"{root}/train/dog/0.png"


def _text(root):
    with open(f"{root}/train/ant/notes.txt", "w") as f:
        f.write("not an image")
    return f"{root}/train/ant/notes.txt"


@pytest.mark.parametrize("damage", [_corrupt, _empty, _text])
def test_bad_files_are_named_or_skipped_and_counted(tmp_path, damage):
    make_tree(tmp_path, TREE)
    bad = damage(tmp_path)
    with pytest.raises(UserError, match="skip_bad_files") as e:
        ip.get_info(cfg(f"imagefolder:{tmp_path}"))
    assert os.path.abspath(bad) in str(e.value) and "\n" not in str(e.value)
    ip.clear_caches()
    c = cfg(f"imagefolder:{tmp_path}", skip_bad_files=True)
    info = ip.get_info(c)
    assert info.num_skipped == 1 and info.skipped_files == {"train": 1}
    n_train = 15 - (damage is not _text)
    assert info.split_sizes["train"] == n_train
    assert sum(b["mask"].sum() for b in ip.eval_batches(c, info, "train")) == n_train


def test_folder_problems_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ip.get_info(cfg(f"imagefolder:{tmp_path}/nowhere"))
    make_tree(tmp_path, {"train": {"cat": 2, "dog": 2}, "test": {"cat": 2}})
    with pytest.raises(UserError, match=f"{tmp_path}/train/dog has no counterpart {tmp_path}/test/dog"):
        ip.get_info(cfg(f"imagefolder:{tmp_path}"))
    ip.clear_caches()
    with pytest.raises(UserError, match=f"{tmp_path}/val does not exist"):
        ip.get_info(cfg(f"imagefolder:{tmp_path}", test_split="val"))
    os.makedirs(tmp_path / "empty" / "cat")
    os.makedirs(tmp_path / "empty" / "dog")
    ip.clear_caches()
    with pytest.raises(UserError, match=f"{tmp_path}/empty has no readable images"):
        ip.get_info(cfg(f"imagefolder:{tmp_path}", test_split="empty"))


def test_a_split_missing_a_class_stops_the_command_with_one_line(tmp_path, capsys):
    """Through the command, before anything trains: test/ lacks a class folder train/ has."""
    make_tree(tmp_path / "data", {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2}})
    c = tiny_config(dataset=f"imagefolder:{tmp_path / 'data'}")
    assert command_status(c, tmp_path / "run") == 1
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    test_dog = tmp_path / "data" / "test" / "dog"
    assert f"has no counterpart {test_dog}" in errors[0]
    assert f"add {test_dog} with images" in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_class_left_without_training_images_is_one_error(tmp_path):
    """The hold-out takes the only image of one class of two; a synthetic train split smaller
    than its class count lacks a class; a dataset of one class (any source) is refused."""
    make_tree(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}})
    c = cfg(f"imagefolder:{tmp_path}", val_fraction=0.5)
    with pytest.raises(UserError) as e:
        ip.check_train_classes(c, ip.get_info(c))
    assert "\n" not in str(e.value)
    assert "has no training images: all 1 of its images in the train split 'train' of " \
           "imagefolder:" in str(e.value) and "--config.val_fraction" in str(e.value)
    c = cfg(f"imagefolder:{tmp_path}")  # Without the hold-out: both classes train.
    ip.check_train_classes(c, ip.get_info(c))
    c = cfg("synthetic")
    c.synthetic.num_train = 3  # 4 classes.
    with pytest.raises(UserError, match="class 'class_3' has no images in the train split"):
        ip.check_train_classes(c, ip.get_info(c))
    c.synthetic.num_train = 8
    info = ip.get_info(c)
    ip.check_train_classes(c, info)
    with pytest.raises(UserError, match=r"synthetic has 1 class \(class_0\): a classifier needs"):
        ip.check_train_classes(c, dataclasses.replace(info, class_names=("class_0",)))


def test_two_hosts_shards_are_disjoint_and_cover_the_split(tmp_path):
    ids = make_tree(tmp_path, TREE)
    c = cfg(f"imagefolder:{tmp_path}", val_fraction=0.2, eval_batch_size=4)
    info = ip.get_info(c)
    assert info.split_sizes == {"train": 12, "validation": 3, "test": 7}
    seen = {}
    for split in ("train", "validation", "test"):
        per_host = [list(ip.eval_batches(c, info, split, shard=(h, 2))) for h in (0, 1)]
        assert len(per_host[0]) == len(per_host[1])  # same step count on every host
        assert all(b["image"].shape[0] == 2 for host in per_host for b in host)  # 4 / 2 hosts
        a, b = (image_ids(h) for h in per_host)
        assert not set(a) & set(b)
        seen[split] = set(a) | set(b)
        assert len(seen[split]) == info.split_sizes[split]
    assert seen["train"] | seen["validation"] == {i for i, (s, _) in ids.items() if s == "train"}
    assert seen["test"] == {i for i, (s, _) in ids.items() if s == "test"}
    # Training shards are disjoint too, and each host gets half the global batch.
    t0, t1 = (next(ip.train_batches(c, info, shard=(h, 2))) for h in (0, 1))
    assert t0["image"].shape[0] == 2 and not set(image_ids([t0])) & set(image_ids([t1]))


def test_validation_holdout_is_seeded_and_stable(tmp_path):
    make_tree(tmp_path, {"train": {"a": 20, "b": 20}, "test": {"a": 1, "b": 1}})

    def val_ids(seed):
        ip.clear_caches()
        c = cfg(f"imagefolder:{tmp_path}", val_fraction=0.25, seed=seed)
        return image_ids(ip.eval_batches(c, ip.get_info(c), "validation"))

    assert len(val_ids(0)) == 10 and val_ids(0) == val_ids(0)
    assert set(val_ids(0)) != set(val_ids(1))


def test_train_batches_resume_exactly(tmp_path):
    c = cfg("synthetic", batch_size=8, seed=3)
    c.synthetic.update(dict(num_train=44, num_test=8, size=4))
    info = ip.get_info(c)
    spe = ip.steps_per_epoch(c, info)
    assert spe == 44 // 8
    stream = ip.train_batches(c, info)
    full = [next(stream) for _ in range(3 * spe)]
    assert all(b["image"].shape == (8, 4, 4, 3) and b["label"].dtype == np.int32 for b in full)
    for k in (3, spe, 2 * spe + 1):
        resumed = ip.train_batches(c, info, start_step=k)
        for want in full[k:]:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    # Within an epoch no example repeats; epochs are shuffled differently.
    keys = [[x.tobytes() for b in full[e * spe : (e + 1) * spe] for x in b["image"]] for e in range(2)]
    assert len(set(keys[0])) == spe * 8 and keys[0] != keys[1]


def test_batch_must_divide_over_devices():
    assert ip.local_batch_size(128, device_count=8, process_count=2) == 64
    with pytest.raises(UserError, match=r"config.eval_batch_size=100 .*device count \(8\)"):
        ip.local_batch_size(100, "eval_batch_size", device_count=8, process_count=1)


def test_synthetic_is_deterministic_and_class_dependent():
    c = cfg("synthetic", eval_batch_size=64)
    info = ip.get_info(c)
    a = [b["image"] for b in ip.eval_batches(c, info, "test")]
    ip.clear_caches()
    b = [b["image"] for b in ip.eval_batches(c, info, "test")]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    batch = next(ip.eval_batches(c, info, "train"))
    means = [batch["image"][batch["label"] == k].mean((0, 1, 2)) for k in range(info.num_classes)]
    assert min(np.abs(m1 - m2).max() for i, m1 in enumerate(means) for m2 in means[i + 1 :]) > 5


@pytest.mark.parametrize("n,batch,count", [(10, 4, 2), (64, 48, 2), (7, 8, 4), (12, 6, 3)])
def test_eval_positions_give_each_host_its_contiguous_part_of_every_batch(n, batch, count):
    """Gathered batch by batch over the hosts, evaluation results come back in the split's
    order (a strided split, ``pos[index::count]``, would interleave them)."""
    from cifar_flax.data.input_pipeline import eval_positions

    parts = [eval_positions(n, batch, (i, count)) for i in range(count)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # Disjoint, covering.
    local = batch // count
    gathered = []
    for b in range(-(-n // batch)):  # Global batch b: host 0's block, then host 1's, ...
        for p in parts:
            gathered += p[b * local:(b + 1) * local].tolist()
    assert gathered == list(range(n))
