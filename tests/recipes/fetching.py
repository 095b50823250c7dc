"""Fixture: fetch and unpack what the test names in the environment."""

import os

from castore import fetch, recipe, unpack


@recipe
def download():
    return fetch(os.environ["CASTORE_TEST_URL"], sha256=os.environ["CASTORE_TEST_SHA256"])


@recipe
def unpacked(d=download):
    return unpack(d)
