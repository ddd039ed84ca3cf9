"""Every string the webmail shows is in the catalogue, and translated into French."""

from __future__ import annotations

from gateway.webmail.catalogue import extract, read_catalogue, translations
from gateway.webmail.web import template_environment


def test_catalogue_template_is_up_to_date() -> None:
    """messages.pot lists exactly what the code and templates use (run `python -m gateway.webmail.catalogue update`)."""
    from babel.messages.pofile import read_po
    from gateway.webmail.catalogue import POT_PATH
    with POT_PATH.open("rb") as handle:
        committed = {message.id for message in read_po(handle) if message.id}
    used = {message.id for message in extract() if message.id}
    assert used == committed, f"missing from messages.pot: {sorted(used - committed)}; stale: {sorted(committed - used)}"


def test_every_string_has_a_french_translation() -> None:
    french = read_catalogue("fr")
    used = {message.id for message in extract() if message.id}
    untranslated = sorted(str(mid) for mid in used if not (french.get(mid) and french.get(mid).string))  # type: ignore[union-attr]
    assert not untranslated, f"untranslated: {untranslated}"
    fuzzy = sorted(str(message.id) for message in french if message.id and message.fuzzy)
    assert not fuzzy, f"fuzzy translations are not served: {fuzzy}"


def test_placeholders_survive_translation() -> None:
    for message in read_catalogue("fr"):
        if message.id and message.string:
            for placeholder in ("%(minutes)s", "%(name)s", "%(count)s", "%(date)s", "%(who)s"):
                assert (placeholder in str(message.id)) == (placeholder in str(message.string)), message.id


def test_pages_render_in_french_from_a_clean_checkout() -> None:
    """The .po is compiled in memory: no .mo file is needed."""
    assert translations("fr").gettext("Sign in") == "Se connecter"
    env = template_environment()
    page = env.get_template("error.html").render(
        title="t", text="x", status=404, request_path="/", nav=[], patient=None, csrf_field=lambda: "")
    assert "Aller au contenu principal" in page and 'lang="fr"' in page
