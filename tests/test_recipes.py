from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from castore.errors import RecipeError
from castore.plan import walk
from castore.recipes import evaluate_target, load_file, parse_size, select
from tests.conftest import RECIPES, REPO


def test_callpackage_style_defaults_and_selection() -> None:
    recipes = load_file(RECIPES / "small.py")
    assert list(recipes) == ["layer", "rootfs", "overlay", "hello"]
    with pytest.raises(RecipeError, match="none is called 'default'"):
        select(recipes, None, "small.py")
    plan = recipes["rootfs"].evaluate()
    assert plan.builder == "squashfs" and plan.name == "rootfs"
    assert next(plan.plan_inputs()) is recipes["layer"].evaluate()  # evaluated once, shared


def test_default_recipe_of_the_demo() -> None:
    r, plan = evaluate_target(str(REPO / "recipes" / "app.py"))
    assert r.name == "default" and plan.builder == "image"
    builders = sorted({p.builder for p in walk(plan)})
    assert builders == ["debian_package", "image", "kernel", "squashfs", "tree", "tree_get", "unpack"]


def test_local_files_are_hashed_relative_to_the_recipe(tmp_path: Path) -> None:
    shutil.copytree(RECIPES, tmp_path / "r")
    a = load_file(tmp_path / "r" / "small.py")["hello"].evaluate()
    b = load_file(RECIPES / "small.py")["hello"].evaluate()
    assert next(a.sources()).id == next(b.sources()).id
    (tmp_path / "r" / "files" / "hello.txt").write_text("changed\n")
    c = load_file(tmp_path / "r" / "small.py")["hello"].evaluate()
    assert next(c.sources()).id != next(b.sources()).id


def test_recipe_that_raises_names_file_and_line() -> None:
    with pytest.raises(RecipeError) as err:
        evaluate_target(str(RECIPES / "bad_raise.py"))
    assert "bad_raise.py:5" in err.value.message  # the line of the failing expression
    assert "KeyError" in err.value.message


def test_missing_local_file_names_file_and_line() -> None:
    with pytest.raises(RecipeError) as err:
        evaluate_target(str(RECIPES / "bad_missing.py"))
    assert "bad_missing.py:6" in err.value.message and "does-not-exist" in err.value.message
    assert err.value.hint and "relative to the recipe" in err.value.hint


def test_syntax_error_and_bad_return() -> None:
    with pytest.raises(RecipeError, match=r"bad_syntax.py:5: syntax error"):
        evaluate_target(str(RECIPES / "bad_syntax.py"))
    with pytest.raises(RecipeError, match=r"bad_return.py:4: recipe default returned 42"):
        evaluate_target(str(RECIPES / "bad_return.py"))
    with pytest.raises(RecipeError, match="not found"):
        evaluate_target(str(RECIPES / "nope.py"))
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        evaluate_target(str(RECIPES / "small.py") + ":nope")


def test_bad_parameters_point_at_the_call(tmp_path: Path) -> None:
    f = tmp_path / "r.py"
    f.write_text("from castore import recipe, ext4, fetch\n\n@recipe\ndef a():\n    return ext4('lots')\n\n"
                 "@recipe\ndef b():\n    return fetch('ftp://x', sha256='0'*64)\n")
    with pytest.raises(RecipeError, match=r"r.py:5: size 'lots'"):
        evaluate_target(f"{f}:a")
    with pytest.raises(RecipeError, match=r"r.py:9: fetch URL"):
        evaluate_target(f"{f}:b")


def test_whitespace_and_comments_change_nothing(tmp_path: Path) -> None:
    from castore.plan import hash_graph

    def h(path: Path) -> str:
        _, plan = evaluate_target(f"{path}:rootfs")
        order, hashes = hash_graph(plan, lambda p: (1, {}))
        return hashes[id(order[-1])][0]

    shutil.copytree(RECIPES, tmp_path / "r")
    f = tmp_path / "r" / "small.py"
    before = h(f)
    text = f.read_text().replace("    return squashfs(", "    # more\n    return  squashfs(")
    f.write_text("# a comment\n\n\n" + text)
    assert h(f) == before


def test_sizes() -> None:
    assert parse_size("1GiB") == 1 << 30 and parse_size("512M") == 512 << 20 and parse_size(4096) == 4096
