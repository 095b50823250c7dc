"""Fixture recipes: a tiny rootfs and an ext4 overlay, quick to build."""

from castore import ext4, local_file, recipe, squashfs, tree


@recipe
def layer():
    return (tree()
            .dirs("/etc", "/proc")
            .dirs("/root", mode=0o700)
            .file("/etc/hello.txt", source="files/hello.txt", mode=0o640, uid=0, gid=42)
            .text("/etc/motd", "welcome\n")
            .symlink("/bin/sh", "busybox")
            .device("/dev/console", "c", 5, 1, mode=0o600)
            .device("/dev/vda", "b", 254, 0, mode=0o660, gid=6)
            .fifo("/run/initctl", mode=0o600))


@recipe
def rootfs(t=layer):
    return squashfs(t, compression="gzip")


@recipe
def overlay():
    return ext4("64MiB", label="overlay")


@recipe
def hello():
    return local_file("files/hello.txt")
