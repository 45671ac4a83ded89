"""PII and secret scrubbing: what is found, what is left alone, and how overlaps resolve."""

from __future__ import annotations

from collections import Counter

import pytest

from lorapipe.pii import PII_KINDS, Finding, Scrubber, placeholder, resolve_overlaps

ALL = Scrubber(PII_KINDS)

# Secret-shaped strings are assembled at run time, so that secret scanners (GitHub push
# protection and the like) do not flag this file. None of them is a real credential.
OPENAI_LEGACY = "sk-" + "Xq7" * 16
OPENAI_PROJECT = "sk-proj-" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5_bC7dE9fG1h-J3kL5mN7pQ9rS1tU3"
ANTHROPIC = "sk-ant-api03-" + "Zx9_Yw8-Vu7" * 8
GITHUB_CLASSIC = "ghp_" + "a1B2c3D4e5F6" * 3
GITHUB_OAUTH = "gho_" + "Q9w8E7r6T5y4" * 3
GITHUB_FINE = "github_pat_11ABCDEFG0" + "123456789_abcdefghijklmnopqrstuvwxyz" * 2
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
SLACK = "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GOOGLE = "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
STRIPE_SECRET = "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk_" + "live_" + "51H8xYzAbCdEfGh1234567890"
HUGGINGFACE = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
JWT = (
    "eyJ" + "hbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJ" + "zdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_BODY = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\nVTLw7onLRnrq0"
RSA_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + PEM_BODY + "\n-----END RSA PRIVATE KEY-----"
PASSWORD = "Tr0ub4dor" + "3xyzQQ7"
TRUNCATED_KEY = (
    "-----BEGIN OPENSSH "
    + "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9u\nZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
)
SENDGRID = "SG." + "aB1cD2eF3gH4iJ5kL6mN7o." + "pQ8rS9tU0vW1xY2zA3bC4dE5fG6hI7jK8lM9nO0pQ1r"
SLACK_WEBHOOK = "https://hooks.slack.com/services/" + "T0123ABCD/B0456EFGH/aB1cD2eF3gH4iJ5kL6"

KEY_FORMATS = {
    "openai legacy": OPENAI_LEGACY,
    "openai project": OPENAI_PROJECT,
    "anthropic": ANTHROPIC,
    "github classic": GITHUB_CLASSIC,
    "github oauth": GITHUB_OAUTH,
    "github fine-grained": GITHUB_FINE,
    "aws access key id": AWS_KEY_ID,
    "slack bot": SLACK,
    "google": GOOGLE,
    "stripe secret": STRIPE_SECRET,
    "stripe restricted": STRIPE_RESTRICTED,
    "huggingface": HUGGINGFACE,
    "jwt": JWT,
    "pem private key": RSA_KEY,
    "pem private key, truncated": TRUNCATED_KEY,
    "gitlab": "glpat-" + "xY9_zW8-vU7tS6rQ5pO4",
    "npm": "npm_" + "aB1cD2eF3gH4iJ5kL6mN7oP8qR9sT0uV1wX2",
    "sendgrid": SENDGRID,
    "stripe webhook": "whsec_" + "aB1cD2eF3gH4iJ5kL6mN7oP8",
    "slack webhook": SLACK_WEBHOOK,
    "pypi": "pypi-AgEIcHlwaS5vcmc" + "CJDQ2YjE3ZDk1LWM4ZTQtNDFiYy1hNzA0LTI4ZDRmNWQ3ZWI1YQ",
}


@pytest.mark.parametrize("secret", KEY_FORMATS.values(), ids=KEY_FORMATS.keys())
def test_documented_token_formats_are_redacted_whole(secret: str) -> None:
    text = f"Here is my key: {secret} -- please keep it safe."
    assert ALL.redact(text) == (
        "Here is my key: [API_KEY] -- please keep it safe.",
        Counter(api_key=1),
    )


# Each kind in the three places training text puts it: prose, a code snippet, a log line.
REALISTIC = [
    (
        "Hi! You can reach me at jane.doe+newsletter@mail.example.co.uk or on my cell, "
        "+1 (415) 555-0132, any time after 5pm.",
        "Hi! You can reach me at [EMAIL] or on my cell, [PHONE], any time after 5pm.",
        {"email": 1, "phone": 1},
    ),
    (
        "import openai\n\n"
        f'client = openai.OpenAI(api_key="{OPENAI_PROJECT}")\n'
        "resp = client.chat.completions.create(model='gpt-4o', messages=msgs)\n",
        "import openai\n\n"
        'client = openai.OpenAI(api_key="[API_KEY]")\n'
        "resp = client.chat.completions.create(model='gpt-4o', messages=msgs)\n",
        {"api_key": 1},
    ),
    (
        "2024-01-15 10:30:12,481 WARN auth: failed login for bob.smith@corp-mail.com "
        "from 81.2.69.142 (attempt 3/5), token=" + GITHUB_CLASSIC,
        "2024-01-15 10:30:12,481 WARN auth: failed login for [EMAIL] "
        "from [IP_ADDRESS] (attempt 3/5), token=[API_KEY]",
        {"email": 1, "ip_address": 1, "api_key": 1},
    ),
    (
        "nginx: 2a03:2880:f12f:83:face:b00c::25de - - [15/Jan/2024:10:30:12 +0000] "
        '"GET /health HTTP/1.1" 200 2 upstream 10.0.0.12:8080',
        "nginx: [IP_ADDRESS] - - [15/Jan/2024:10:30:12 +0000] "
        '"GET /health HTTP/1.1" 200 2 upstream [IP_ADDRESS]:8080',
        {"ip_address": 2},
    ),
    (
        "Our offices: London +44 20 7946 0958, New York (212) 555 0199, support line "
        "415-555-0132. Email sales@example.org for pricing ($1,250.00/month).",
        "Our offices: London [PHONE], New York [PHONE], support line "
        "[PHONE]. Email [EMAIL] for pricing ($1,250.00/month).",
        {"phone": 3, "email": 1},
    ),
    (
        'DATABASE_URL = "postgres://admin:' + PASSWORD + '@db.example.com:5432/app"\n'
        "headers = {'Authorization': 'Bearer " + JWT + "'}\n",
        'DATABASE_URL = "postgres://admin:[API_KEY]@db.example.com:5432/app"\n'
        "headers = {'Authorization': 'Bearer [API_KEY]'}\n",
        {"api_key": 2},
    ),
    (
        'creds = {"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\n'
        'MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\\n-----END PRIVATE KEY-----\\n", '
        '"client_email": "bot@proj-123.iam.gserviceaccount.com"}',
        'creds = {"type": "service_account", "private_key": "[API_KEY]\\n", '
        '"client_email": "[EMAIL]"}',
        {"api_key": 1, "email": 1},
    ),
    (
        f'export AWS_ACCESS_KEY_ID={AWS_KEY_ID}\nexport AWS_SECRET_ACCESS_KEY="wJalrXUtnFEMI/K7'
        'MDENG/bPxRfiCYEXAMPLEKEY"\nexport SLACK_TOKEN=' + SLACK,
        'export AWS_ACCESS_KEY_ID=[API_KEY]\nexport AWS_SECRET_ACCESS_KEY="[API_KEY]"\n'
        "export SLACK_TOKEN=[API_KEY]",
        {"api_key": 3},
    ),
]


def test_credentials_in_http_headers_are_redacted() -> None:
    text = "curl -H 'Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l' https://api.example.com"
    assert ALL.redact(text) == (
        "curl -H 'Authorization: Basic [API_KEY]' https://api.example.com",
        Counter(api_key=1),
    )


@pytest.mark.parametrize(("text", "redacted", "counts"), REALISTIC)
def test_realistic_text_is_redacted_with_placeholders_and_counts(
    text: str, redacted: str, counts: dict[str, int]
) -> None:
    assert ALL.redact(text) == (redacted, Counter(counts))


@pytest.mark.parametrize(("text", "redacted", "counts"), REALISTIC)
def test_redacting_redacted_text_changes_nothing(
    text: str, redacted: str, counts: dict[str, int]
) -> None:
    assert ALL.redact(redacted) == (redacted, Counter())


def test_placeholders_name_the_kind() -> None:
    assert [placeholder(k) for k in PII_KINDS] == [
        "[EMAIL]",
        "[PHONE]",
        "[API_KEY]",
        "[IP_ADDRESS]",
    ]


def test_find_reports_kinds_and_offsets_sorted_by_start() -> None:
    text = "ip 81.2.69.142, mail a.b@example.com, call 415-555-0132"
    findings = ALL.find(text)
    assert [(f.kind, text[f.start : f.end]) for f in findings] == [
        ("ip_address", "81.2.69.142"),
        ("email", "a.b@example.com"),
        ("phone", "415-555-0132"),
    ]


@pytest.mark.parametrize(
    "phone",
    [
        "+1 (415) 555-0132",
        "415-555-0132",
        "+44 20 7946 0958",
        "(212) 555 0199",
        "415.555.0132",
        "4155550132",
        "1-800-555-0199",
        "+33 1 42 68 53 00",
        "+49 30 901820",
        "+91 98765 43210",
    ],
)
def test_phone_numbers_are_found_whole(phone: str) -> None:
    text = f"Call me on {phone} tomorrow."
    assert [text[f.start : f.end] for f in ALL.find(text)] == [phone]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Send it to Jane.Doe@Example.COM.", "Jane.Doe@Example.COM"),
        ("<bob+tag@mx.mail.example.io>", "bob+tag@mx.mail.example.io"),
        ('{"email": "o\'neil_99@uni.example.edu"}', "o'neil_99@uni.example.edu"),
        ("mailto:first.last@example.org?subject=hi", "first.last@example.org"),
        ("send_mail(to='ops-team@example.com')", "ops-team@example.com"),
    ],
)
def test_email_forms_are_found(text: str, found: str) -> None:
    assert [text[f.start : f.end] for f in ALL.find(text)] == [found]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("server at 81.2.69.142.", "81.2.69.142"),
        ("curl http://81.2.69.142:8080/api", "81.2.69.142"),
        ("dns 2001:4860:4860::8888, done", "2001:4860:4860::8888"),
        ("listen [2a03:2880:f12f:83:face:b00c::25de]:443", "2a03:2880:f12f:83:face:b00c::25de"),
        # Private and documentation ranges name hosts too.
        ("ssh pi@192.168.1.50 -p 22", "192.168.1.50"),
        ("db at 10.0.0.12:5432", "10.0.0.12"),
        ("example host 203.0.113.195", "203.0.113.195"),
        ("peer fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a"),
        ("client ::ffff:81.2.69.142 connected", "::ffff:81.2.69.142"),
    ],
)
def test_public_ip_addresses_are_found(text: str, found: str) -> None:
    assert [text[f.start : f.end] for f in ALL.find(text)] == [found]


def test_north_american_layouts_count_in_area_codes_libphonenumber_rejects() -> None:
    # 741 and 556 are unassigned area codes, as in much synthetic data.
    text = "Call (741) 555-4821 or 556-555-5287."
    assert ALL.redact(text) == ("Call [PHONE] or [PHONE].", Counter(phone=2))


def test_phones_in_a_table_of_figures_are_found() -> None:
    row = " ".join(str(n) for n in range(10, 40))
    # Each line is one run of more digits than any number holds.
    text = f"{row} (741) 555-4821 {row}\n+44 20 7946 0958 / {row}"
    assert ALL.redact(text) == (
        f"{row} [PHONE] {row}\n[PHONE] / {row}",
        Counter(phone=2),
    )


def test_phone_region_reads_national_numbers() -> None:
    text = "ring the office on 020 7946 0958 before noon"
    assert Scrubber(["phone"], phone_region="GB").redact(text)[1] == Counter(phone=1)
    # The same digits are no US number.
    assert Scrubber(["phone"], phone_region="US").find(text) == []


# Numbers, code and identifiers that must survive untouched (all kinds enabled).
NOT_PII = [
    "0x1F",
    "pi is 3.14159 and e is 2.718281828459045",
    "released on 2024-01-15",
    "2024-01-15 10:30:00 INFO started",
    "on 01/15/2024 at 10:30",
    "upgrade to v1.2.3 or 1.2.3",
    "it costs $1,250.00 or $1,250,000.00",
    "meet at 10:30",
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2",
    "zip 94105 or 94105-1234",
    "order id 123456789012, user_id: 1234567",
    "timestamp 1705312200",
    "x = -0.4155550132 + 1e-10",
    "user_4155550132, build v2.4155550132, mean 4155550132.5",
    "arr[10:30], ratio 1:1000000, chmod 0755",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "CVE-2024-12345 fixed in pages 123-145",
    "(2019) 123-456",
    "mac 00:1A:2B:3C:4D:5E",
    "std::vector<int> v; a::b::c",
    "nine groups 2a03:2880:f12f:83:face:b00c:0:25de:1f2e",
    "999.1.1.1 and 256.0.0.1",
    "version 1.2.3.4, v1.2.3.4, numpy==1.26.4.1, 1.2.3.4.5",
    "app.run(host='0.0.0.0'); ping 127.0.0.1 or ::1; listen [::]:80; from ::ffff:127.0.0.1",
    "netmask 255.255.255.0, wildcard 0.0.0.255, mDNS 224.0.0.251, all-nodes ff02::1",
    "@app.route('/users') and @property and @dataclass(frozen=True)",
    "mail root@localhost, ping @channel",
    "npm i lodash@4.17.21 @types/node@20.1.0 react@latest",
    "git clone git@github.com:owner/repo.git",
    "background: url(icon@2x.png)",
    "token = self.tokenizer(text)",
    "api_key = os.environ['OPENAI_API_KEY']",
    "password = get_password_2024_from_vault()",
    "secret: ${{ secrets.GITHUB_TOKEN }}",
    "pad_token = '<|endoftext|>', max_tokens = 4096",
    "sorted(items, key=lambda d: d['age'], reverse=True)",
    "the sk-learn compatible API and hf_hub_download()",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "Bearer tokens expire after an hour",
    "Authorization: Bearer YOUR_ACCESS_TOKEN_HERE",
    "api_key: YOUR_OPENAI_API_KEY_HERE",
    "our sk-learn-compatible-transformer-pipeline-api wrapper",
]


@pytest.mark.parametrize("text", NOT_PII)
def test_no_false_positives(text: str) -> None:
    assert ALL.find(text) == []


CODE = """def train(model, loader, lr=3e-4, steps=10_000):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999))
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        if step % 1000 == 0:
            print(f"{step:>6} {loss.item():.6f} 2024-01-15T10:30:00")
"""


def test_code_snippet_without_pii_is_unchanged() -> None:
    assert ALL.redact(CODE) == (CODE, Counter())


def test_telegram_token_holding_a_phone_number_is_one_api_key() -> None:
    token = "4155550132:" + "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
    text = f"bot token {token} ok"
    # The digits alone are a valid phone number; the longer token wins.
    assert Scrubber(["phone"]).find(text) == [Finding("phone", 10, 20)]
    assert ALL.redact(text) == ("bot token [API_KEY] ok", Counter(api_key=1))


def test_sms_gateway_address_is_one_email_not_a_phone() -> None:
    text = "text 4155550132@txt.att.net now"
    assert ALL.redact(text) == ("text [EMAIL] now", Counter(email=1))


def test_url_password_is_an_api_key_not_an_email() -> None:
    text = "https://alice:" + PASSWORD + "@mail.example.com/inbox and mailto:alice@example.com"
    assert ALL.redact(text) == (
        "https://alice:[API_KEY]@mail.example.com/inbox and mailto:[EMAIL]",
        Counter(api_key=1, email=1),
    )


def test_email_inside_a_url_is_redacted_alone() -> None:
    text = "see https://example.com/u/jane.doe@gmail.com/profile?tab=1"
    assert ALL.redact(text)[0] == "see https://example.com/u/[EMAIL]/profile?tab=1"


def test_overlaps_resolve_longest_first_then_kind_order() -> None:
    findings = [
        Finding("phone", 0, 10),  # overlaps the longer key: dropped
        Finding("email", 5, 12),  # overlaps the longer key: dropped
        Finding("api_key", 8, 30),  # longest: kept
        Finding("email", 30, 40),  # touches the key, does not overlap: kept
    ]
    expected = [Finding("api_key", 8, 30), Finding("email", 30, 40)]
    assert resolve_overlaps(findings) == resolve_overlaps(findings[::-1]) == expected
    # Equal spans: the kind listed first in PII_KINDS wins, whatever the input order.
    equal = [Finding("ip_address", 0, 10), Finding("phone", 0, 10)]
    assert resolve_overlaps(equal) == resolve_overlaps(equal[::-1]) == [Finding("phone", 0, 10)]


def test_only_the_chosen_kinds_are_scrubbed() -> None:
    text = "mail a.b@example.com, call 415-555-0132, key " + AWS_KEY_ID + ", ip 81.2.69.142"
    assert Scrubber(["email", "ip_address"]).redact(text) == (
        "mail [EMAIL], call 415-555-0132, key " + AWS_KEY_ID + ", ip [IP_ADDRESS]",
        Counter(email=1, ip_address=1),
    )


def test_counts_add_up_per_kind() -> None:
    text = " ".join(f"user{i}@example.com" for i in range(5)) + " " + OPENAI_LEGACY
    assert ALL.redact(text)[1] == Counter(email=5, api_key=1)


def test_unknown_kind_is_a_one_line_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"unknown PII kind\(s\) \['ssn'\].*email"):
        Scrubber(["email", "ssn"])


def test_unknown_phone_region_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown phone region 'USA'"):
        Scrubber(["phone"], phone_region="USA")


def test_a_repeated_text_is_redacted_alike_each_time() -> None:
    """redact remembers recent texts (a system prompt on every row); callers get their own
    counts, so one caller's changes never reach the next."""
    scrubber = Scrubber(PII_KINDS)
    text = "Write to jane.doe@example.com or 203.0.113.7"
    first, counts = scrubber.redact(text)
    counts["email"] += 5
    assert scrubber.redact(text) == (first, Counter(email=1, ip_address=1))
    assert first == "Write to [EMAIL] or [IP_ADDRESS]"
