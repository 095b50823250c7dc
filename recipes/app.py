"""The demo image: a Firecracker/Celestial-ready kernel and busybox rootfs, from Debian's packages.

    castore realize recipes/app.py            # builds kernel, rootfs, image; prints the image id
    castore realize recipes/app.py:rootfs     # just the squashfs rootfs

Adapting it (see recipes/README.md for more):
- your app: replace files/app.sh, or add your binary with
  ``.file("/usr/local/bin/myapp", source="files/myapp", mode=0o755)`` and call it from app.sh;
- extra files: ``.file(...)`` from this folder, ``.text(path, "...")`` for small ones,
  ``.merge(unpack(debian_package(...)))`` for whole packages;
- kernel options: add CONFIG_...=y lines to files/microvm.config (the build fails if one is dropped).
"""

from castore import debian_package, image, kernel, recipe, squashfs, tree, unpack

# busybox applets the image links in /bin (the rootfs is read-only: no `busybox --install` at boot)
APPLETS = [
    "sh", "ash", "mount", "umount", "mkdir", "rmdir", "pivot_root", "grep", "sync", "fsfreeze", "reboot",
    "poweroff", "halt", "sleep", "echo", "printf", "test", "[", "true", "false", "cat", "ls", "cp", "mv",
    "rm", "ln", "chmod", "chown", "touch", "date", "uname", "env", "head", "tail", "wc", "sort", "uniq",
    "tr", "cut", "sed", "awk", "find", "xargs", "ps", "kill", "dmesg", "df", "du", "stat", "hostname",
    "id", "basename", "dirname", "readlink", "tee", "mktemp", "seq", "expr",
]


@recipe
def busybox():
    return debian_package("busybox-static", "1:1.35.0-4+deb12u1+b1",
                          sha256="3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744")


@recipe
def linux_source():
    return debian_package("linux-source-6.1", "6.1.192-3",
                          sha256="5259c57ca92092da39bd2ea803046da0e3c28f2b6a11ea20f6297468188ceb67")


@recipe
def vmlinux(src=linux_source):
    return kernel(source=unpack(src).get("usr/src/linux-source-6.1.tar.xz"),
                  config="files/microvm.config")


@recipe
def rootfs(bb=busybox):
    t = tree().merge(unpack(bb), only=["bin/busybox"])
    for applet in APPLETS:
        t.symlink(f"/bin/{applet}", "busybox")
    t.file("/sbin/init", source="files/init.sh", mode=0o755)
    t.file("/app.sh", source="files/app.sh", mode=0o755)
    t.dirs("/overlay", "/mnt", "/rom", "/proc", "/sys", "/dev", "/tmp", "/etc")
    t.dirs("/root", mode=0o700)
    t.text("/etc/hostname", "castore-demo\n")
    t.device("/dev/console", "c", 5, 1, mode=0o600)
    t.device("/dev/null", "c", 1, 3, mode=0o666)
    return squashfs(t, compression="zstd")


@recipe
def default(k=vmlinux, r=rootfs):
    return image(kernel=k, rootfs=r, overlay_size="1GiB", vcpus=1, mem_mib=128)
