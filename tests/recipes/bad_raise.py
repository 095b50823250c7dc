from castore import recipe, tree


def helper():
    return {}["missing"]


@recipe
def default():
    t = tree().dirs("/etc")
    helper()
    return t
