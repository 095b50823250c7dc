from castore import recipe


@recipe
def default():
    return 42
