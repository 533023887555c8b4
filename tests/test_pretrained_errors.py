"""Bad inputs get one clear error: missing, wrong-architecture, truncated and corrupt files,
checksum mismatches, offline downloads (a refused connection; a host name that does not resolve,
which fails at once), weights that don't fit the model. Also the download -> verify -> convert ->
cache path, through ``file://`` URLs. No test touches the network."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_flax import UserError, models, pretrained
from cifar_flax.weights import convert, files, registry, store
from cifar_flax.weights.registry import Release


def torchvision_state_dict(layers, bottleneck: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Names and shapes of torchvision's resnet18/34 (basic blocks) or resnet50 (bottleneck)."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name, out, inp, k):
        sd[f"{name}.weight"] = rng.standard_normal((out, inp, k, k), np.float32)

    def bn(name, c):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{name}.{leaf}"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, n in enumerate(layers):
        width = 64 * 2**i
        out = 4 * width if bottleneck else width
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            kernels = [(width, inplanes, 1), (width, width, 3), (out, width, 1)] if bottleneck \
                else [(width, inplanes, 3), (width, width, 3)]
            for j, (o, c, k) in enumerate(kernels, start=1):
                conv(f"{p}.conv{j}", o, c, k)
                bn(f"{p}.bn{j}", o)
            if b == 0 and (i > 0 or inplanes != out):
                conv(f"{p}.downsample.0", out, inplanes, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    sd["fc.weight"] = rng.standard_normal((1000, inplanes), np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


@pytest.fixture(scope="module")
def resnet50_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("r50") / "resnet50-fake.npz"
    np.savez(path, **torchvision_state_dict((3, 4, 6, 3), bottleneck=True))
    return path


@pytest.fixture(scope="module")
def weights(resnet50_npz):
    return convert.convert_file("torchvision", str(resnet50_npz))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_FLAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _set_release(monkeypatch, url, digest, source="torchvision", variant="IMAGENET1K_V2"):
    monkeypatch.setitem(registry.RELEASES[source], variant, Release(url, "sha256", digest))


def test_missing_file(tmp_path, cache):
    with pytest.raises(UserError, match="does not exist"):
        convert.convert_file("torchvision", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="pretrained.file .* does not exist"):
        store.load_pretrained("torchvision", file=str(tmp_path / "nope.pth"))


def test_cli_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.pth"
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_flax.pretrained", "convert", "--source", "torchvision",
         "--input", str(missing), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0]


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_resnet18_is_rejected_with_names(tmp_path, fmt):
    sd = torchvision_state_dict((2, 2, 2, 2), bottleneck=False)
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "npz":
        np.savez(path, **sd)
    else:
        from safetensors.numpy import save_file

        save_file(sd, str(path))
    with pytest.raises(UserError) as e:
        convert.convert_file("torchvision", str(path))
    msg = str(e.value)
    assert "not a torchvision ResNet50" in msg and "\n" not in msg
    assert "missing" in msg and "layer1.0.conv3.weight" in msg
    assert "wrong shape" in msg and "layer1.0.conv1.weight (64, 64, 3, 3)" in msg


def test_wrong_source_and_extra_tensors(tmp_path, resnet50_npz):
    match = r"not a keras ResNet50.*conv1_conv/kernel.*conv1.weight"
    with pytest.raises(UserError, match=match):
        convert.convert_file("keras", str(resnet50_npz))
    sd = dict(np.load(resnet50_npz))
    sd["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    np.savez(tmp_path / "extra.npz", **sd)
    with pytest.raises(UserError, match=r"1 unexpected \[layer5.0.conv1.weight\]"):
        convert.convert_file("torchvision", str(tmp_path / "extra.npz"))


def test_classifier_dropped_and_layout(weights, resnet50_npz):
    sd = np.load(resnet50_npz)
    np.testing.assert_array_equal(
        weights.params["stage2"]["block1"]["proj_conv"]["kernel"],
        sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(weights.batch_stats["stage4"]["block3"]["bn3"]["var"],
                                  sd["layer4.2.bn3.running_var"])
    assert "fc" not in weights.params and weights.spec.layout == "v1.5"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_files(tmp_path, resnet50_npz):
    small = {"conv1.weight": np.ones((64, 3, 7, 7), np.float32)}
    np.savez(tmp_path / "t.npz", **small)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.attrs["layer_names"] = [b"conv1_conv"]
        g = f.create_group("conv1_conv")
        g.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
        g.create_dataset("conv1_conv/kernel:0", data=np.ones((7, 7, 3, 64), np.float32))
    paths = [tmp_path / "t.npz", tmp_path / "t.h5"]
    try:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in small.items()}, tmp_path / "t.pth")
        paths.append(tmp_path / "t.pth")
    except ImportError:
        pass
    for path in paths:
        _truncate(path)
        source = "keras" if path.suffix == ".h5" else "torchvision"
        with pytest.raises(UserError, match=r"t\.\w+.*(truncated|corrupt)") as e:
            convert.convert_file(source, str(path))
        assert "\n" not in str(e.value)


def test_checksum_mismatch_discards_download(tmp_path, cache, monkeypatch):
    junk = tmp_path / "resnet50-junk.npz"
    junk.write_bytes(b"not the weights" * 100)
    _set_release(monkeypatch, junk.as_uri(), "0" * 64)
    match = "Checksum mismatch for file://.*--config.pretrained.file="
    with pytest.raises(UserError, match=match):
        store.load_pretrained("torchvision", cache_dir="")
    assert os.listdir(cache / "downloads") == []  # neither the file nor a partial download


def test_offline_download_is_one_clear_line(cache, monkeypatch):
    url = "http://127.0.0.1:9/resnet50-11ad3fa6.pth"
    _set_release(monkeypatch, url, "0" * 64)
    with pytest.raises(UserError) as e:
        store.load_pretrained("torchvision")
    msg = str(e.value)
    assert msg.startswith(f"Could not download {url}") and "\n" not in msg
    assert "--config.pretrained.file=/path/to/resnet50-11ad3fa6.pth" in msg
    assert "convert --source=torchvision --input=" in msg
    assert not (cache / "converted").exists()




def test_unresolvable_host_fails_at_once_naming_it(cache, no_dns):
    """No DNS: one line at once (no retries) naming the host, that the machine seems offline,
    and how to pass the file instead; nothing is left in the cache."""
    release = registry.RELEASES["torchvision"]["IMAGENET1K_V2"]
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        store.load_pretrained("torchvision")
    assert time.monotonic() - start < 5
    msg = str(e.value)
    print(f"\n{msg}")
    assert no_dns == ["download.pytorch.org"]
    assert msg == (
        f"Could not download {release.url}: its host download.pytorch.org cannot be resolved "
        "(DNS), so this machine seems to be offline. Download resnet50-11ad3fa6.pth elsewhere "
        "and pass it with --config.pretrained.file=/path/to/resnet50-11ad3fa6.pth (or convert "
        "it first: python -m cifar_flax.pretrained convert --source=torchvision "
        "--input=/path/to/resnet50-11ad3fa6.pth --output=DIR, then --config.pretrained.file=DIR)."
    )
    assert os.listdir(cache / "downloads") == [] and not (cache / "converted").exists()


def test_unresolvable_host_keras_names_its_file(cache, no_dns):
    with pytest.raises(UserError) as e:
        store.load_pretrained("keras")
    msg = str(e.value)
    assert "\n" not in msg and "its host storage.googleapis.com cannot be resolved" in msg
    assert "seems to be offline" in msg
    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert f"--config.pretrained.file=/path/to/{name}" in msg
    assert f"convert --source=keras --input=/path/to/{name} --output=DIR" in msg


def test_unresolvable_proxy_is_named(cache, no_dns, monkeypatch):
    """Behind a proxy the proxy's name is the one that must resolve (and is named)."""
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    urllib.request.install_opener(None)  # urlopen's opener reads the proxy variables once.
    try:
        with pytest.raises(UserError, match="its proxy host proxy.example cannot be resolved"):
            store.load_pretrained("torchvision")
    finally:
        urllib.request.install_opener(None)
    assert no_dns == ["proxy.example"]


def test_long_download_error_is_cut_at_a_word(cache, monkeypatch):
    def urlopen(url, timeout):
        raise OSError("the server said " + "something rather long " * 20 + "endword")

    monkeypatch.setattr(files.urllib.request, "urlopen", urlopen)
    with pytest.raises(UserError) as e:
        store.load_pretrained("torchvision")
    reason = str(e.value).split(" (", 1)[1].split("). ", 1)[0]
    assert reason.endswith("...") and len(reason) <= 203 and "endword" not in reason
    assert reason[:-3].split()[-1] in {"something", "rather", "long"}  # a whole word


def test_download_verify_convert_cache(resnet50_npz, weights, cache, monkeypatch, tmp_path):
    _set_release(monkeypatch, resnet50_npz.as_uri(), files.file_hash(str(resnet50_npz),
                                                                          "sha256"))
    got = store.load_pretrained("torchvision")
    assert (cache / "downloads" / resnet50_npz.name).is_file()
    assert store.is_converted(str(cache / "converted" / "torchvision-IMAGENET1K_V2"))
    assert got.spec.variant == "IMAGENET1K_V2" and got.spec.preprocessing.name == "torch"
    # Offline now: served from the converted cache.
    _set_release(monkeypatch, "http://127.0.0.1:9/x.pth", "0" * 64)
    again = store.load_pretrained("torchvision", "IMAGENET1K_V2")
    for a, b in zip(jax.tree.leaves(weights.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    # A `convert` output directory works as pretrained.file.
    store.save_weights(again, str(tmp_path / "conv"))
    from_dir = store.load_pretrained("torchvision", file=str(tmp_path / "conv"))
    assert from_dir.spec == again.spec
    with pytest.raises(UserError, match="not torchvision|set pretrained.source"):
        store.load_pretrained("keras", file=str(tmp_path / "conv"))


def test_local_file_is_cached_by_hash(resnet50_npz, cache):
    store.load_pretrained("torchvision", file=str(resnet50_npz))
    converted = os.listdir(cache / "converted")
    assert len(converted) == 1 and converted[0].startswith("torchvision-file-")


def test_save_refuses_foreign_directory(weights, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="does not hold converted weights"):
        store.save_weights(weights, str(tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _abstract_variables(**kw):
    model = models.create_model(num_classes=10, head_hidden=(16,), **kw)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_merge_into_fills_backbone_only(weights):
    variables = _abstract_variables(layout="v1.5")
    merged = convert.merge_into(variables, weights)
    assert merged["params"]["head"] is variables["params"]["head"]
    for coll, src in (("params", weights.params), ("batch_stats", weights.batch_stats)):
        ours = {k: v for k, v in merged[coll].items() if k in models.BACKBONE_MODULES}
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(src)):
            np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("kw, field", [
    ({"layout": "v1"}, "model.layout='v1.5'"),
    ({"layout": "v1.5", "stage_sizes": (1, 1, 1, 1)}, "model.stage_sizes=(3, 4, 6, 3)"),
    ({"layout": "v1.5", "base_width": 8}, "model.base_width=64"),
])
def test_merge_into_mismatch_names_the_field(weights, kw, field):
    with pytest.raises(UserError, match="don't fit the model") as e:
        convert.merge_into(_abstract_variables(**kw), weights)
    assert field in str(e.value)


def test_unknown_source_and_variant():
    with pytest.raises(UserError, match="pretrained.source"):
        registry.source_spec("timm")
    with pytest.raises(UserError, match="pretrained.variant 'IMAGENET1K_V2'.*notop"):
        registry.source_spec("keras", "IMAGENET1K_V2")
    spec = registry.source_spec("", layout="v1")
    assert spec.layout == "v1" and spec.preprocessing.name == "simple"
    assert registry.source_spec("keras").variant == "notop"
    assert registry.source_spec("torchvision").variant == "IMAGENET1K_V2"


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 32, 32, 3), np.float32), "uint8 NHWC"),
    (np.zeros((2, 16, 16, 3), np.uint8), "at least 32x32"),
])
def test_features_cli_rejects_bad_images(weights, tmp_path, capsys, images, match):
    store.save_weights(weights, str(tmp_path / "w"))
    np.save(tmp_path / "x.npy", images)
    rc = pretrained.main(["features", f"--weights={tmp_path / 'w'}",
                          f"--images={tmp_path / 'x.npy'}", f"--output={tmp_path / 'f.npy'}"])
    err = capsys.readouterr().err
    assert rc == 1 and match in err and not (tmp_path / "f.npy").exists()
