"""boto3 (the official AWS SDK for Python) against `meterline serve`: every operation of the
`meteringmarketplace` service, each modeled exception caught by its class, and a throttled
call retried by botocore's standard retry mode after the server's x-amz-retry-after.

Seller code written for AWS changes only two things here, the documented ones: the endpoint
URL, and the `X-Api-Key` header added on botocore's `before-send` event (credentials are
dummies; the SDK signs with SigV4, Meterline authenticates by the key).

Run by tests/boto3.rs, which starts the servers and passes, in the environment:
METERLINE_URL, METERLINE_THROTTLED_URL, METERLINE_TOKEN (an issued registration token),
METERLINE_LICENSE (a licence ARN of cust-a's analytics agreement).
Prints one line per check; exits non-zero on the first failed check.
"""

import os
import sys
import time
from datetime import datetime, timedelta, timezone

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

URL = os.environ["METERLINE_URL"]
THROTTLED_URL = os.environ["METERLINE_THROTTLED_URL"]
TOKEN = os.environ["METERLINE_TOKEN"]
LICENSE = os.environ["METERLINE_LICENSE"]


def client(key, url=URL, attempts=1, validate=True):
    c = boto3.client(
        "meteringmarketplace",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="dummy-secret",
        config=Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=5,
            read_timeout=30,
            parameter_validation=validate,
        ),
    )

    def add_key(request, **_):
        request.headers["X-Api-Key"] = key

    c.meta.events.register("before-send.*", add_key)
    return c


def hours_ago(n):
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(hours=n) + timedelta(minutes=1)


def check(what, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


def raises(what, exc_class_or_code, call):
    """The call fails with the modeled class (checked by `except`) or, for unmodeled errors, the code."""
    try:
        call()
    except ClientError as e:
        code = e.response["Error"]["Code"]
        if isinstance(exc_class_or_code, str):
            check(what, code == exc_class_or_code, f"got {code}")
        else:
            check(what, isinstance(e, exc_class_or_code), f"got {type(e).__name__} ({code})")
        check(what + " carries x-amzn-RequestId", bool(e.response["ResponseMetadata"].get("RequestId")))
        return e
    check(what, False, "no error raised")


def rec(dimension, at, **kw):
    r = {"Timestamp": at, "Dimension": dimension}
    r.update(kw)
    return r


acme = client("demo-key-acme")
ex = acme.exceptions
at = hours_ago(1)

# --- BatchMeterUsage, current model: QuantityAsDecimal (decimal text) -------------------------
r = acme.batch_meter_usage(
    ProductCode="acme-analytics",
    UsageRecords=[rec("users", at, CustomerAWSAccountId="111122223333", QuantityAsDecimal="250")],
)
res = r["Results"][0]
check("QuantityAsDecimal is metered (Success)", res["Status"] == "Success", r)
check("answers carry x-amzn-RequestId", bool(r["ResponseMetadata"].get("RequestId")))
first_id = res["MeteringRecordId"]
r = acme.batch_meter_usage(
    ProductCode="acme-analytics", UsageRecords=[rec("users", at, CustomerAWSAccountId="111122223333", Quantity=250)]
)
check("the same quantity by the previous model's field is the same record", r["Results"][0]["MeteringRecordId"] == first_id, r)
r = acme.batch_meter_usage(
    ProductCode="acme-analytics",
    UsageRecords=[
        rec("users", at, CustomerAWSAccountId="111122223333", QuantityAsDecimal="251"),
        rec("users", at, CustomerAWSAccountId="999999999999", Quantity=1),
    ],
)
check(
    "per-record statuses stay in the model's enum",
    [x["Status"] for x in r["Results"]] == ["DuplicateRecord", "CustomerNotSubscribed"],
    r,
)
r = acme.batch_meter_usage(UsageRecords=[rec("gb_ingest", hours_ago(2), LicenseArn=LICENSE, QuantityAsDecimal="12")])
check("a licence-only call without ProductCode is metered", r["Results"][0]["Status"] == "Success", r)

good = rec("gb_ingest", hours_ago(3), CustomerAWSAccountId="111122223333", Quantity=1)
bmu = lambda records, c=acme, product="acme-analytics": c.batch_meter_usage(ProductCode=product, UsageRecords=records)
raises("fraction under the integer profile", "ValidationException", lambda: bmu([good, rec("users", at, CustomerAWSAccountId="111122223333", QuantityAsDecimal="2.5")]))
raises("no quantity at all is refused, never stored as 0", "ValidationException", lambda: bmu([good, rec("users", hours_ago(4), CustomerAWSAccountId="111122223333")]))
raises("Quantity and QuantityAsDecimal that differ", "ValidationException", lambda: bmu([good, rec("users", hours_ago(4), CustomerAWSAccountId="111122223333", Quantity=3, QuantityAsDecimal="4")]))
raises("another seller's product", ex.InvalidProductCodeException, lambda: bmu([good], c=client("demo-key-globex")))
raises("an unknown product", ex.InvalidProductCodeException, lambda: bmu([good], product="no-such-product"))
raises("a stale timestamp", ex.TimestampOutOfBoundsException, lambda: bmu([good, rec("users", hours_ago(8), CustomerAWSAccountId="111122223333", Quantity=1)]))
raises("an unknown dimension", ex.InvalidUsageDimensionException, lambda: bmu([good, rec("seats", at, CustomerAWSAccountId="111122223333", Quantity=1)]))
raises("both customer identifiers", ex.InvalidCustomerIdentifierException, lambda: bmu([good, rec("users", at, CustomerIdentifier="cid-alpha", CustomerAWSAccountId="111122223333", Quantity=1)]))
raises(
    "allocations that do not sum",
    ex.InvalidUsageAllocationsException,
    lambda: bmu([good, rec("users", at, CustomerAWSAccountId="111122223333", QuantityAsDecimal="3", UsageAllocations=[{"AllocatedUsageQuantityAsDecimal": "2"}])]),
)
raises(
    "a bad tag",
    ex.InvalidTagException,
    lambda: bmu([good, rec("users", at, CustomerAWSAccountId="111122223333", Quantity=3, UsageAllocations=[{"AllocatedUsageQuantity": 3, "Tags": [{"Key": "cost#centre", "Value": "x"}]}])]),
)
raises("an unknown licence", ex.InvalidLicenseException, lambda: bmu([good, rec("users", at, LicenseArn="arn:aws:license-manager::1:license:l-nope", Quantity=1)]))

# --- MeterUsage from the buyer's deployments --------------------------------------------------
a1, a2 = client("dep-key-a1"), client("dep-key-a2")
mu = lambda c, q, when=at, dim="c5_xlarge", **kw: c.meter_usage(ProductCode="acme-vm", Timestamp=when, UsageDimension=dim, UsageQuantityAsDecimal=q, **kw)
id1 = mu(a1, "3")["MeteringRecordId"]
id2 = mu(a2, "4")["MeteringRecordId"]
check("two deployments in one hour are two records", id1 != id2)
check("an identical call returns the same id", mu(a1, "3")["MeteringRecordId"] == id1)
raises("another quantity for the slot", ex.DuplicateRequestException, lambda: mu(a1, "5"))
e = raises("DryRun answers DryRunOperation", "DryRunOperation", lambda: mu(a1, "9", when=hours_ago(2), DryRun=True))
check("DryRunOperation is HTTP 412", e.response["ResponseMetadata"]["HTTPStatusCode"] == 412)
check("...and stored nothing: the slot is free", bool(mu(a1, "1", when=hours_ago(2))["MeteringRecordId"]))
raises("a deployment of a customer without an agreement", ex.CustomerNotEntitledException, lambda: mu(client("dep-key-b1"), "1"))
raises("an unknown dimension", ex.InvalidUsageDimensionException, lambda: mu(a1, "1", dim="c5_2xlarge"))
raises("a stale timestamp", ex.TimestampOutOfBoundsException, lambda: mu(a1, "1", when=hours_ago(8)))
raises("another product than the deployment's", ex.InvalidProductCodeException, lambda: a1.meter_usage(ProductCode="acme-analytics", Timestamp=at, UsageDimension="users", UsageQuantity=1))

# --- ResolveCustomer and RegisterUsage --------------------------------------------------------
r = acme.resolve_customer(RegistrationToken=TOKEN)
check(
    "ResolveCustomer answers the customer",
    (r["CustomerIdentifier"], r["CustomerAWSAccountId"], r["ProductCode"], r.get("LicenseArn")) == ("cid-alpha", "111122223333", "acme-analytics", LICENSE),
    r,
)
raises("a forged token", ex.InvalidTokenException, lambda: acme.resolve_customer(RegistrationToken="mlrt-forged"))
raises("an expired token", ex.ExpiredTokenException, lambda: acme.resolve_customer(RegistrationToken="mlrt-old"))
r = a1.register_usage(ProductCode="acme-vm", PublicKeyVersion=1, Nonce="n-1")
check("RegisterUsage answers a signature", len(r.get("Signature", "")) == 64 and "PublicKeyRotationTimestamp" in r, r)
raises("RegisterUsage without entitlement", ex.CustomerNotEntitledException, lambda: client("dep-key-b1").register_usage(ProductCode="acme-vm", PublicKeyVersion=1))
# botocore refuses version 0 itself (the model's min is 1); without its validation the server does.
a1_unchecked = client("dep-key-a1", validate=False)
raises("RegisterUsage with key version 0", ex.InvalidPublicKeyVersionException, lambda: a1_unchecked.register_usage(ProductCode="acme-vm", PublicKeyVersion=0))

# --- Throttling: caught by its class, and retried by botocore after x-amz-retry-after ----------
once = client("demo-key-acme", url=THROTTLED_URL, attempts=1)
once.batch_meter_usage(ProductCode="acme-analytics", UsageRecords=[rec("users", at, CustomerAWSAccountId="111122223333", Quantity=1)])
raises("over the seller's rate", ex.ThrottlingException, lambda: once.batch_meter_usage(ProductCode="acme-analytics", UsageRecords=[rec("gb_ingest", at, CustomerAWSAccountId="111122223333", Quantity=1)]))
time.sleep(1.1)
retrying = client("demo-key-acme", url=THROTTLED_URL, attempts=3)
retrying.batch_meter_usage(ProductCode="acme-analytics", UsageRecords=[rec("users", hours_ago(2), CustomerAWSAccountId="111122223333", Quantity=2)])
started = time.monotonic()
r = retrying.batch_meter_usage(ProductCode="acme-analytics", UsageRecords=[rec("gb_ingest", hours_ago(2), CustomerAWSAccountId="111122223333", Quantity=2)])
waited = time.monotonic() - started
check("a throttled call is retried and succeeds", r["Results"][0]["Status"] == "Success" and r["ResponseMetadata"]["RetryAttempts"] >= 1, r)
check("botocore waited for the server's Retry-After", 0.8 <= waited < 10, f"{waited:.2f} s")
print("all boto3 checks passed")
