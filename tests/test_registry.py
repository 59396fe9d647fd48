import pytest

import jaxformers


def test_list_models_and_pattern():
    names = jaxformers.list_models()
    assert names == sorted(names)
    assert {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"} <= set(names)
    assert jaxformers.list_models("vit_*_patch16_224") == ["vit_base_patch16_224", "vit_small_patch16_224",
                                                           "vit_tiny_patch16_224"]
    assert jaxformers.list_models("no_such_*") == []


def test_model_info_has_paper_facts():
    info = jaxformers.model_info("vit_small_patch16_224")
    assert info.arxiv == "2010.11929" and info.repo == "google-research/vision_transformer"
    assert info.input_size == (224, 224, 3) and info.params_m == 22.05 and info.top1 == 79.8
    assert info.name == "vit_small_patch16_224" and info.family == "vit"


def test_every_registered_model_has_complete_info():
    for name in jaxformers.list_models():
        info = jaxformers.model_info(name)
        assert info.paper and info.input_size, name


def test_unknown_model_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown model 'vit_tiny_patch16'.*vit_tiny_patch16_224"):
        jaxformers.create_model("vit_tiny_patch16")


def test_unknown_override_names_valid_fields():
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['embed_dimension'\].*embed_dim"):
        jaxformers.create_model("vit_tiny_patch16_224", embed_dimension=3)


def test_count_params_follows_overrides():
    base = jaxformers.count_params("vit_tiny_patch16_224")
    assert base == 5_717_416
    assert jaxformers.count_params("vit_tiny_patch16_224", num_classes=10) == base - 990 * 193
    model = jaxformers.create_model("vit_tiny_patch16_224", depth=1)
    assert jaxformers.count_params(model) < base


def test_register_twice_fails():
    from jaxformers.registry import ModelInfo, register_model

    def vit_tiny_patch16_224():  # same name as an existing entry
        raise AssertionError

    with pytest.raises(ValueError, match="registered twice"):
        register_model(ModelInfo(paper="x"))(vit_tiny_patch16_224)


@pytest.mark.parametrize("module", __import__("jaxformers.models", fromlist=["MODEL_MODULES"]).MODEL_MODULES)
def test_every_model_file_imports(module):
    import importlib

    importlib.import_module(f"jaxformers.models.{module}")
