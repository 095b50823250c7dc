from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from castore.errors import RecipeError
from castore.plan import walk
from castore.recipes import evaluate_target, load_file, parse_size, select
from tests.conftest import RECIPES, REPO, castore, castore_json


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


_IMPORTS = "from castore import ext4, fetch, get, image, recipe, squashfs, tree\n"
_K = "ext4('1MiB')"  # any blob plan stands in for a kernel and a layer here


@pytest.mark.parametrize("call, message", [
    ('tree().text("/a", "x", uid="root")', "uid 'root' must be an int from 0 to 4294967295"),
    ('tree().text("/a", "x\\udc80")', "'\\udc80' at position 1, which is not valid in UTF-8"),
    ('tree().text("/a", b"x")', "must be a str, got bytes"),
    ('tree().device("/dev/x", "c", "five", 1)', "major 'five' must be an int"),
    ('tree().device("/dev/x", "c", 1, 2**32)', "minor 4294967296 must be an int from 0 to 4294967295"),
    ('tree().device("/dev/x", "c", True, 1)', "major True must be an int"),
    ('tree().text("/a", "x", uid=2**40)', "uid 1099511627776 must be an int from 0 to 4294967295"),
    ('tree().dirs("/a", gid=-1)', "gid -1 must be an int"),
    ('tree().fifo("/a", mode=True)', "mode True must be an int between 0 and 0o7777"),
    ('tree().chmod("/a", 0o10000)', "mode 4096 must be an int between 0 and 0o7777"),
    ('tree().chmod("/a", "755")', "mode '755' must be an int"),
    ('tree().chown("/a", 0, "0")', "gid '0' must be an int"),
    ('tree().chown("/a", 0, 0, recursive=1)', "recursive= must be True or False"),
    ('tree().symlink(b"/a", "b")', "path must be a str, got bytes"),
    ('tree().symlink("/a", 5)', "target must be a str, got int"),
    ('tree().symlink("/a\\udcff", "b")', "not valid in UTF-8"),
    ('tree().remove("/a", None)', "path must be a str, got NoneType"),
    ('tree().file("/a", source=5)', "file must be a path"),
    ('tree().merge(tree().dirs("/x"), only="x")', "only= must be a list of paths"),
    ('tree().merge(tree().dirs("/x"), prefix="../up")', "climbs out"),
    ('get(tree().dirs("/x"), "../x")', "climbs out"),
    ('get(tree().dirs("/x"), 5)', "get's path must be a str"),
    (f"image(kernel={_K}, rootfs={_K}, cmdline=5)", "image cmdline must be a str, got int 5"),
    (f"image(kernel={_K}, rootfs={_K}, cmdline='a\\0b')", "contains a NUL"),
    (f"image(kernel={_K}, rootfs={_K}, vcpus=True)", "vcpus True must be an int from 1 to 32"),
    (f"image(kernel={_K}, rootfs={_K}, mem_mib=2**40)", "mem_mib 1099511627776 must be an int"),
    (f"image(kernel={_K}, rootfs={_K}, overlay_size=True)", "size True is not understood"),
    (f"image(kernel={_K}, rootfs={_K}, overlay_size=0)", "overlay_size 0 must be at least 1MiB"),
    (f"image(kernel={_K}, rootfs={_K}, overlay_size='9999999999TiB')", "is too large"),
    (f"image(kernel={_K}, rootfs=[{_K}, 5])", "rootfs layer 1 must be a plan"),
    (f"image(kernel={_K}, rootfs={_K}, name=7)", "name must be a str"),
    ('squashfs(tree().dirs("/x"), block_size="big")', "block_size 'big' must be a power of two"),
    ('squashfs(tree().dirs("/x"), block_size=True)', "block_size True must be a power of two"),
    ("ext4('1MiB', label=5)", "ext4 label must be a str"),
    ("ext4('1MiB', label='\u00e9' * 9)", "longer than 16 bytes"),
    ("ext4(2**70)", "is too large"),
    ("fetch(5, sha256='0' * 64)", "fetch URL must be a str"),
    ("fetch('https://x/y', sha256=5)", "sha256 5 must be 64 lowercase hex digits"),
    ('tree().file("/a", source="f\\0.txt")', "file 'f\\x00.txt' holds a NUL character"),
    ('__import__("castore").local_file("x\\0")', "holds a NUL character"),
    ("__import__('json').loads('{bad')", "raised JSONDecodeError"),  # the line, not json/decoder.py's
    ("(_ for _ in ()).throw(GeneratorExit)", "raised GeneratorExit"),  # a BaseException, not an Exception
    (f"__import__('castore').kernel(source={_K}, config='c', tools='gzip')", "must be a list of program names"),
    (f"__import__('castore').kernel(source={_K}, config='c', tools=['../sh'])", "must be a list of program names"),
])
def test_bad_arguments_are_reported_at_the_recipe_line(tmp_path: Path, call: str, message: str) -> None:
    """Wrong types and out-of-range values fail at evaluation, naming the line that passed them."""
    f = tmp_path / "r.py"
    f.write_text(f"{_IMPORTS}\n\n@recipe\ndef default():\n    return {call}\n")
    with pytest.raises(RecipeError) as err:
        evaluate_target(str(f))
    assert err.value.message.split(": ", 1)[0].endswith("r.py:6"), err.value.message
    assert message in err.value.message
    err.value.message.encode()  # printable: a lone surrogate is shown escaped, never raw


def test_a_recipe_called_with_wrong_arguments_names_the_call(tmp_path: Path) -> None:
    f = tmp_path / "r.py"
    f.write_text(f"{_IMPORTS}\n\n@recipe\ndef other():\n    return ext4('1MiB')\n\n\n"
                 "@recipe\ndef default():\n    return other(1, 2)\n")
    with pytest.raises(RecipeError) as err:
        evaluate_target(str(f))
    assert err.value.message.split(": ", 1)[0].endswith("r.py:11"), err.value.message  # not inspect.py's line


def test_a_kernel_may_name_more_tools(tmp_path: Path) -> None:
    (tmp_path / "c").write_text("CONFIG_IKCONFIG=y\n")
    f = tmp_path / "r.py"
    f.write_text(f"{_IMPORTS}from castore import kernel\n\n@recipe\ndef default():\n"
                 f"    return kernel(source={_K}, config='c', tools=['gzip', 'cpio', 'gzip'])\n\n"
                 f"@recipe\ndef plain():\n    return kernel(source={_K}, config='c')\n")
    assert evaluate_target(str(f))[1].params["tools"] == ["cpio", "gzip"]
    assert "tools" not in evaluate_target(f"{f}:plain")[1].params  # the plans of recipes without stay


def test_edge_values_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "r.py"
    f.write_text(f"{_IMPORTS}\n\n@recipe\ndef default():\n    return image(kernel={_K}, rootfs=squashfs(tree()\n"
                 "        .text('/a', 'caf\u00e9\\n', mode=0o7777, uid=2**32 - 1, gid=0)\n"
                 "        .device('/dev/x', 'b', 0, 2**32 - 1).chown('/a', 0, 2**32 - 1, recursive=True)\n"
                 "        .merge(tree().dirs('/x'), only=('x',), prefix='/opt')),\n"
                 "        cmdline='console=ttyS0', overlay_size='1MiB', vcpus=32, mem_mib=2**32 - 1)\n")
    _, plan = evaluate_target(str(f))
    assert plan.params["overlay_size"] == 1 << 20 and plan.params["mem_mib"] == 2**32 - 1


def test_sys_exit_in_a_recipe_is_an_error_at_its_line(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"bad_exit.py:9: recipe default called sys.exit\(0\)") as err:
        evaluate_target(str(RECIPES / "bad_exit.py"))
    assert err.value.hint and "raise an exception" in err.value.hint
    with pytest.raises(RecipeError, match=r"bad_exit_load.py:5: the recipe file called sys.exit\(0\)"):
        evaluate_target(str(RECIPES / "bad_exit_load.py"))
    # and the CLI says so and fails, instead of exiting 0 without a word
    for name, line in (("bad_exit.py", 9), ("bad_exit_load.py", 5)):
        proc = castore("realize", f"tests/recipes/{name}", store=tmp_path / "store", check=False)
        assert proc.returncode == 1 and f"{name}:{line}: " in proc.stderr and "sys.exit(0)" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_nul_byte_in_a_recipe_file_names_its_line(tmp_path: Path) -> None:
    f = tmp_path / "nul.py"
    f.write_bytes(b"from castore import recipe\n\nx = 1\0\n")
    with pytest.raises(RecipeError) as err:
        evaluate_target(str(f))
    assert err.value.message.endswith("nul.py:3: the recipe file contains a NUL byte")  # the path as shown
    assert "None" not in err.value.message


def test_recipe_files_are_modules_that_import_their_neighbours(tmp_path: Path) -> None:
    d = tmp_path / "my:recipes"  # a ':' in the path: FILE[:NAME] splits at the last one
    d.mkdir()
    (d / "helper.py").write_text("def content():\n    return 'from helper\\n'\n")
    (d / "r.py").write_text(
        "from __future__ import annotations\n"
        "import enum, pickle\n"
        "from dataclasses import dataclass\n"
        "from castore import recipe, tree\n\n"
        "@dataclass\nclass Cfg:\n    name: str = 'x'\n\n"
        "class Mode(enum.Enum):\n    A = 1\n\n"
        "@recipe\ndef default():\n"
        "    import helper  # imported while the recipe runs, after the file has loaded\n"
        "    assert pickle.loads(pickle.dumps(Mode.A)) is Mode.A\n"
        "    return tree().text('/h', helper.content() + Cfg().name)\n\n"
        "@recipe\ndef other():\n    return tree().text('/o', 'o')\n")
    whole, plan = evaluate_target(str(d / "r.py"))
    assert whole.name == "default" and plan.builder == "tree"
    named, _ = evaluate_target(f"{d / 'r.py'}:other")
    assert named.name == "other"
    with pytest.raises(RecipeError, match="has no recipe 'nope'"):
        evaluate_target(f"{d / 'r.py'}:nope")
    assert str(d) not in sys.path  # only while loading and evaluating


def test_helper_modules_are_read_from_their_source_never_from_a_stale_pycache(tmp_path: Path) -> None:
    import py_compile

    (tmp_path / "r.py").write_text("import helper\nfrom castore import ext4, recipe\n\n\n"
                                   "@recipe\ndef default():\n    return ext4(helper.SIZE)\n")
    helper = tmp_path / "helper.py"
    helper.write_text('SIZE = "64MiB"\n')
    py_compile.compile(str(helper))  # what an earlier evaluation by a Python that writes bytecode left
    stamp = helper.stat()
    helper.write_text('SIZE = "32MiB"\n')  # same size, and (as within one second) the same mtime
    os.utime(helper, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from castore.recipes import evaluate_target; "
                           "print(evaluate_target(sys.argv[1])[1].params['size'])", str(tmp_path / "r.py")],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert proc.stdout.split() == [str(32 << 20)]
    shutil.rmtree(tmp_path / "__pycache__")
    subprocess.run([sys.executable, "-c", "import sys; from castore.recipes import evaluate_target; "
                    "evaluate_target(sys.argv[1])", str(tmp_path / "r.py")], cwd=REPO, env=env, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helper.py", "r.py"]  # evaluation wrote nothing


def test_merge_only_is_a_set_of_paths_whatever_its_order(tmp_path: Path) -> None:
    f = tmp_path / "r.py"
    hashes = set()
    for only in ('["etc/b", "/etc/a", "c"]', '{"c", "etc/a", "etc/b"}', '["c", "etc/a", "etc//b", "c"]'):
        f.write_text(f"{_IMPORTS}\n\n@recipe\ndef default():\n"
                     f"    return tree().merge(tree().dirs('/etc/a', '/etc/b', '/c', '/d'), only={only})\n")
        for seed in ("1", "2"):
            plans = castore_json("realize", str(f), "--dry-run", store=tmp_path / "s",
                                 env={"PYTHONHASHSEED": seed})["plans"]
            hashes.add(plans[-1]["plan"])
    assert len(hashes) == 1


def test_a_recipe_folder_named_like_the_package_is_the_recipe_s() -> None:
    from castore import recipes

    beside = os.path.join(os.path.dirname(recipes.__file__) + "_images", "r.py")  # .../castore_images/r.py
    scope: dict[str, object] = {"caller": recipes._caller}
    exec(compile("found = caller()", beside, "exec"), scope)
    assert scope["found"].f_code.co_filename == beside  # type: ignore[attr-defined]
