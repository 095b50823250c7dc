from castore import recipe, squashfs, tree


@recipe
def default():
    return squashfs(tree().file("/etc/x", source="files/does-not-exist"))
