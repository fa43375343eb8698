"""The ZooKeeper digest identity derived from the cluster key, and the key's way
from make_driver to the driver (no ZooKeeper needed: nothing connects here)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from kazoo.security import make_digest_acl_credential

from sheep.cluster.driver import make_driver
from sheep.cluster.local import LocalDriver
from sheep.cluster.zookeeper import ZooKeeperDriver, digest_password, digest_user
from sheep.errors import UsageError

KEY = bytes(range(32))


def test_the_password_is_an_hmac_of_the_key_and_never_the_key():
    password = digest_password(KEY)
    assert password == digest_password(KEY)  # every sheep of a cluster derives the same
    assert password != digest_password(bytes(32))
    assert base64.b64decode(password) == hmac.new(
        KEY, b"sheepdog zookeeper digest", hashlib.sha256).digest()
    assert ":" not in password  # ZooKeeper splits user:password at the first colon
    assert KEY.hex() not in password and base64.b64encode(KEY).decode() not in password


def test_make_driver_hands_the_key_to_the_zookeeper_driver():
    driver = make_driver("zookeeper:127.0.0.1:2181/keyed", secret=KEY)
    assert isinstance(driver, ZooKeeperDriver)
    assert driver._auth == [("digest", f"{digest_user}:{digest_password(KEY)}")]
    [acl] = driver._acl
    assert acl.perms == 31 and acl.id.scheme == "digest"  # all of read..admin, for us alone
    assert acl.id.id == make_digest_acl_credential(digest_user, digest_password(KEY))
    info = driver.info()
    assert info["acl"] == "digest"
    assert digest_password(KEY) not in repr(info) and KEY.hex() not in repr(info)


def test_without_a_key_znodes_stay_open_and_the_local_driver_ignores_it(tmp_path):
    driver = make_driver("zookeeper:127.0.0.1:2181")
    assert isinstance(driver, ZooKeeperDriver)
    assert driver._auth == [] and driver._acl is None and driver.info()["acl"] == "open"
    assert isinstance(make_driver(f"local:{tmp_path}", secret=KEY), LocalDriver)
    with pytest.raises(UsageError, match="empty"):
        make_driver("zookeeper:127.0.0.1:2181", secret=b"")
