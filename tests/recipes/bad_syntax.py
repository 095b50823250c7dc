from castore import recipe


@recipe
def default(:
    pass
