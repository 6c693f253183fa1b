//! How a rule selects cgroups: `match` (a regular expression over the
//! path), `app` (an XDG application ID), `unit` (a systemd unit) or
//! `container` (a container ID). Every form compiles once, at config load,
//! to one anchored regular expression over the path rules see (`/` plus the
//! path below the cgroup root), so matching costs the same whatever the form.
//!
//! The names launchers and managers give cgroups, which the forms follow:
//! - systemd's desktop conventions (systemd.io/DESKTOP_ENVIRONMENTS):
//!   `app[-<launcher>]-<appid>[@<instance>].service` and
//!   `app[-<launcher>]-<appid>-<random>.scope`, the app ID escaped as
//!   systemd escapes unit names (`-` becomes `\x2d`); GNOME writes
//!   `app-gnome-<appid>-<pid>.scope`, KDE `app-<appid>@<id>.service` and
//!   `app-<appid>-<id>.scope`, Flatpak `app-flatpak-<appid>-<pid>.scope`;
//! - snapd: `snap.<snap>.<app>-<uuid>.scope` for apps a user starts,
//!   `snap.<snap>.<app>.service` for its daemons;
//! - systemd units: `<name>.<type>` anywhere in the tree (system slices, a
//!   user's `user@UID.service`, a container's own manager);
//! - container managers with the systemd cgroup driver:
//!   `docker-<id>.scope`, `libpod-<id>.scope` (Podman),
//!   `cri-containerd-<id>.scope`, `crio-<id>.scope`; Docker's cgroupfs
//!   driver: `/docker/<id>`.

use std::fmt::Write as _;

use regex_lite::Regex;

/// A rule's selector, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    Match(String),
    App { id: String, user: Option<u32> },
    Unit { name: String, user: Option<u32> },
    Container(String),
}

impl Form {
    /// The JSON key of the form.
    pub fn key(&self) -> &'static str {
        match self {
            Form::Match(_) => "match",
            Form::App { .. } => "app",
            Form::Unit { .. } => "unit",
            Form::Container(_) => "container",
        }
    }

    /// The value as written (the regex, app ID, unit name or container ID).
    pub fn value(&self) -> &str {
        match self {
            Form::Match(s) | Form::Container(s) => s,
            Form::App { id, .. } => id,
            Form::Unit { name, .. } => name,
        }
    }

    pub fn user(&self) -> Option<u32> {
        match self {
            Form::App { user, .. } | Form::Unit { user, .. } => *user,
            _ => None,
        }
    }

    /// The regular expression the form stands for (not yet anchored).
    /// Fails with what is wrong with the value.
    pub fn pattern(&self) -> Result<String, String> {
        match self {
            Form::Match(p) => Ok(p.clone()),
            Form::App { id, user } => app_pattern(id, *user, BELOW),
            Form::Unit { name, user } => unit_pattern(name, *user, BELOW),
            Form::Container(id) => container_pattern(id, BELOW),
        }
    }

    /// Compiles the form, anchored to the whole path.
    pub fn compile(&self) -> Result<Regex, String> {
        let p = self.pattern()?;
        // `.` also matches a newline, since cgroup names may contain one and
        // `/.*` should still mean "everything below".
        Regex::new(&format!("(?s)^(?:{p})$")).map_err(|e| match self {
            Form::Match(_) => format!("invalid regular expression {p:?}: {e}"),
            // A bug of ours, not the user's: say so plainly.
            _ => format!("internal error: the pattern {p:?} does not compile: {e}"),
        })
    }
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A regex shows as it always did; the other forms say what they are.
        match self {
            Form::Match(p) => write!(f, "{p:?}")?,
            _ => write!(f, "{} {:?}", self.key(), self.value())?,
        }
        if let Some(u) = self.user() {
            write!(f, " user {u}")?;
        }
        Ok(())
    }
}

/// systemd's `unit_name_escape` (src/basic/unit-name.c): `/` becomes `-`;
/// a leading `.`, every `-` and `\`, and every byte outside
/// `[0-9A-Za-z:_.]` become `\xNN` (lowercase hex).
pub fn unit_name_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let plain = b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.');
        if b == b'/' {
            out.push('-');
        } else if plain && !(i == 0 && b == b'.') {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The inverse of [`unit_name_escape`] for display (`\xNN` back to the
/// byte, `-` back to `/` is NOT done: app IDs and unit names have no `/`).
/// Invalid escapes stay as they are.
pub fn unit_name_unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let Some(v) = b
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A regex matching `s`, a piece of a cgroup path, literally in the form
/// rules match ([`crate::cgroup::escape`]: the backslashes of systemd's
/// `\x2d` are themselves escaped there).
fn lit(s: &str) -> String {
    regex_lite::escape(&crate::cgroup::escape(s.as_bytes()))
}

/// Where a unit lives: anywhere in the tree, or in one user's manager.
fn prefix(user: Option<u32>) -> String {
    match user {
        None => "(?:/[^/]+)*/".to_string(),
        Some(u) => format!("/user\\.slice/user-{u}\\.slice/user@{u}\\.service(?:/[^/]+)*/"),
    }
}

/// The unit's own cgroup and everything below it.
const BELOW: &str = "(?:/.*)?";

const MAX_NAME: usize = 255;

/// XDG application IDs (reverse DNS, `org.telegram.desktop`) and desktop
/// file names without `.desktop`; snap names and `snap.<snap>.<app>`.
fn app_pattern(id: &str, user: Option<u32>, tail: &str) -> Result<String, String> {
    if id.is_empty() || id.len() > MAX_NAME {
        return Err(format!("{id:?}: an app ID has 1 to {MAX_NAME} bytes"));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{id:?}: {bad:?} cannot be in an application ID (letters, digits, '.', '_' and '-' only; write the ID unescaped, as in org.telegram.desktop or code-oss)"
        ));
    }
    if let Some(d) = id.strip_suffix(".service").or(id.strip_suffix(".scope")) {
        return Err(format!(
            "{id:?} is a unit name; write \"unit\": {id:?}, or \"app\": \"{d}\" for the app"
        ));
    }
    let esc = lit(&unit_name_escape(id));
    // The launcher is one word (no `-`: the app ID is escaped, so the
    // first `-` after the launcher starts it).
    let mut alts = vec![
        format!("app(?:-[^-/]+)?-{esc}(?:@[^/]*)?\\.service"),
        // The random part has no `-` (a PID, or a UUID without dashes), so
        // a short ID never swallows a launcher and another ID.
        format!("app(?:-[^-/]+)?-{esc}-[^-/]+\\.scope"),
    ];
    if id.contains('-') {
        // Flatpak writes the ID as it is.
        alts.push(format!("app-flatpak-{}-[0-9]+\\.scope", lit(id)));
    }
    // Snap: `snap.<snap>.<app>`, its desktop ID `<snap>_<app>`, or a bare
    // snap name (no dots: reverse-DNS IDs always have one) for all its apps.
    let snap = if let Some(rest) = id.strip_prefix("snap.") {
        rest.split_once('.')
            .map(|(s, a)| (s.to_string(), Some(a.to_string())))
    } else if let Some((s, a)) = id.split_once('_')
        && !s.contains('.')
    {
        Some((s.to_string(), Some(a.to_string())))
    } else if !id.contains('.') {
        Some((id.to_string(), None))
    } else {
        None
    };
    if let Some((name, app)) = snap {
        let app = app.map_or("[^/.]+".to_string(), |a| lit(&a));
        alts.push(format!(
            "snap\\.{}\\.{app}(?:-[^/]+\\.scope|\\.service)",
            lit(&name)
        ));
    }
    Ok(format!("{}(?:{}){tail}", prefix(user), alts.join("|")))
}

const UNIT_TYPES: &[&str] = &["service", "scope", "slice", "socket", "mount", "swap"];

/// A unit name as systemd shows it (`foo.service`, `foo@bar.service`,
/// `foo@.service` for every instance, `a-b.slice`).
fn unit_pattern(name: &str, user: Option<u32>, tail: &str) -> Result<String, String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("{name:?}: a unit name has 1 to {MAX_NAME} bytes"));
    }
    let Some((stem, ty)) = name.rsplit_once('.') else {
        return Err(format!(
            "{name:?} has no unit type; write \"{name}.service\" (or .scope, .slice)"
        ));
    };
    if !UNIT_TYPES.contains(&ty) {
        return Err(format!(
            "{name:?}: .{ty} units have no cgroup of their own; name a .service, .scope, .slice, .socket, .mount or .swap"
        ));
    }
    if stem.is_empty() {
        return Err(format!("{name:?}: the unit name before .{ty} is empty"));
    }
    if let Some(bad) = stem
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.' | '\\' | '@')))
    {
        return Err(format!(
            "{name:?}: {bad:?} is not valid in a unit name; write the name as systemctl shows it (escape with `systemd-escape`)"
        ));
    }
    let unit = match stem.split_once('@') {
        Some((_, inst)) if inst.contains('@') => {
            return Err(format!("{name:?}: more than one '@'"));
        }
        // A template names every instance.
        Some((t, "")) => format!("{}@[^/]+\\.{ty}", lit(t)),
        _ => lit(name),
    };
    Ok(format!("{}{unit}{tail}", prefix(user)))
}

/// A container ID or its prefix (at least the 12 hex digits `docker ps`
/// and `podman ps` show).
fn container_pattern(id: &str, tail: &str) -> Result<String, String> {
    let id = id.to_ascii_lowercase();
    if !(12..=64).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{id:?}: a container ID is 12 to 64 hex digits (as `docker ps --no-trunc` or `podman ps` print it; names do not appear in cgroup paths)"
        ));
    }
    let full = format!("{}[0-9a-f]{{{}}}", lit(&id), 64 - id.len());
    Ok(format!(
        "(?:/[^/]+)*/(?:(?:docker|libpod|cri-containerd|crio)-{full}\\.scope|docker/{full}){tail}"
    ))
}

/// Regexes matching the cgroups `name` is the name of (an app ID's
/// instances, a unit, a container), without what is below them: how
/// `explain` finds them. Empty when `name` is none of these.
pub fn instance_forms(name: &str) -> Vec<Regex> {
    [
        app_pattern(name, None, ""),
        unit_pattern(name, None, ""),
        container_pattern(name, ""),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .filter_map(|p| Regex::new(&format!("(?s)^(?:{p})$")).ok())
    .collect()
}

/// A cgroup's name as a user knows it: the app, unit or container it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// An app instance: the app ID (unescaped), the launcher, the user.
    App {
        id: String,
        launcher: Option<String>,
        user: Option<u32>,
    },
    Container {
        id: String,
        manager: &'static str,
    },
    /// Any other unit (service, scope, slice ...), with the user whose
    /// manager runs it.
    Unit {
        name: String,
        user: Option<u32>,
    },
}

impl Named {
    /// What to write in a rule to select it.
    pub fn rule(&self) -> String {
        match self {
            Named::App { id, user: None, .. } => format!("\"app\": {id:?}"),
            Named::App {
                id, user: Some(u), ..
            } => format!("\"app\": {id:?}, \"user\": {u}"),
            Named::Container { id, .. } => format!("\"container\": {:?}", &id[..12.min(id.len())]),
            Named::Unit { name, user: None } => format!("\"unit\": {name:?}"),
            Named::Unit {
                name,
                user: Some(u),
            } => format!("\"unit\": {name:?}, \"user\": {u}"),
        }
    }

    /// `app org.telegram.desktop`, `container 0123456789ab (docker)`,
    /// `unit mihomo.service`.
    /// Names come from cgroupfs (anyone who may make a cgroup picks them,
    /// and systemd's `\xNN` unescaping can yield any byte), so they are
    /// shown in the injective escaped form: no control or bidi character
    /// reaches a terminal.
    pub fn label(&self) -> String {
        let e = |s: &str| crate::cgroup::display(s.as_bytes());
        match self {
            Named::App { id, launcher, .. } => match launcher {
                Some(l) => format!("app {} ({})", e(id), e(l)),
                None => format!("app {}", e(id)),
            },
            Named::Container { id, manager } => {
                let short: String = id.chars().take(12).collect();
                format!("container {} ({manager})", e(&short))
            }
            Named::Unit { name, .. } => format!("unit {}", e(name)),
        }
    }
}

/// Parses one cgroup directory name as a launcher or manager wrote it.
/// `user` is the user whose manager the cgroup is under, if any.
pub fn name_of(component: &str, user: Option<u32>) -> Option<Named> {
    for (pre, manager) in [
        ("docker-", "docker"),
        ("libpod-", "podman"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
    ] {
        if let Some(id) = component
            .strip_prefix(pre)
            .and_then(|r| r.strip_suffix(".scope"))
            && id.len() == 64
            && id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Some(Named::Container {
                id: id.to_string(),
                manager,
            });
        }
    }
    let (stem, ty) = component.rsplit_once('.')?;
    if !UNIT_TYPES.contains(&ty) || stem.is_empty() {
        return None;
    }
    if let Some(rest) = stem.strip_prefix("snap.")
        && let Some((snap, app)) = rest.split_once('.')
    {
        let app = match ty {
            "scope" => app.split_once('-').map_or(app, |(a, _)| a),
            _ => app,
        };
        return Some(Named::App {
            id: format!("snap.{snap}.{app}"),
            launcher: Some("snap".into()),
            user,
        });
    }
    if let Some(rest) = stem.strip_prefix("app-")
        && matches!(ty, "service" | "scope")
    {
        // app[-<launcher>]-<appid>[@<instance>].service
        // app[-<launcher>]-<appid>-<random>.scope
        let body = match ty {
            "service" => rest.split_once('@').map_or(rest, |(b, _)| b),
            _ => rest.rsplit_once('-').map(|(b, _)| b)?,
        };
        let (launcher, id) = match body.split_once('-') {
            Some((l, id)) => (Some(l.to_string()), id),
            None => (None, body),
        };
        if id.is_empty() {
            return None;
        }
        return Some(Named::App {
            id: unit_name_unescape(id),
            launcher,
            user,
        });
    }
    Some(Named::Unit {
        name: component.to_string(),
        user,
    })
}

/// The user whose manager a path is under (`/user.slice/user-UID.slice/user@UID.service/...`).
pub fn user_of(path: &str) -> Option<u32> {
    let rest = path.strip_prefix("/user.slice/user-")?;
    let (uid, rest) = rest.split_once(".slice/user@")?;
    let (uid2, _) = rest.split_once(".service")?;
    (uid == uid2).then(|| uid.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compiled form, matched as the daemon matches: against the path's
    /// match form (a systemd `\x2d` is `\\x2d` there).
    struct Rx(Regex);

    impl Rx {
        fn is_match(&self, path: &str) -> bool {
            self.0.is_match(&crate::cgroup::escape(path.as_bytes()))
        }
    }

    fn rx(f: Form) -> Rx {
        Rx(f.compile().unwrap())
    }

    fn app(id: &str) -> Rx {
        rx(Form::App {
            id: id.into(),
            user: None,
        })
    }

    fn unit(n: &str) -> Rx {
        rx(Form::Unit {
            name: n.into(),
            user: None,
        })
    }

    const U: &str = "/user.slice/user-1000.slice/user@1000.service";

    #[test]
    fn escape_is_systemds() {
        // Expected values from `systemd-escape` (systemd 252).
        assert_eq!(unit_name_escape("code-oss"), "code\\x2doss");
        assert_eq!(
            unit_name_escape("org.telegram.desktop"),
            "org.telegram.desktop"
        );
        assert_eq!(unit_name_escape(".hidden"), "\\x2ehidden");
        assert_eq!(unit_name_escape("a/b c\\d"), "a-b\\x20c\\x5cd");
        assert_eq!(unit_name_escape("x:y_z.1"), "x:y_z.1");
        assert_eq!(unit_name_escape("ä"), "\\xc3\\xa4");
        assert_eq!(unit_name_unescape("code\\x2doss"), "code-oss");
        assert_eq!(unit_name_unescape("bad\\xzz"), "bad\\xzz");
    }

    #[test]
    fn app_matches_every_launcher_form() {
        let t = app("org.telegram.desktop");
        for p in [
            // Flatpak (what the README's old rule missed)
            "/app-flatpak-org.telegram.desktop-12345.scope",
            // GNOME Shell (glib), with a child cgroup
            "/app.slice/app-gnome-org.telegram.desktop-4242.scope",
            "/app.slice/app-gnome-org.telegram.desktop-4242.scope/child",
            // KDE Plasma: services with an instance, scopes with an id
            "/app.slice/app-org.telegram.desktop@0a1b2c3d4e5f.service",
            "/app.slice/app-org.telegram.desktop-0a1b2c3d4e5f.scope",
            // a launcher without instance
            "/app.slice/app-org.telegram.desktop.service",
        ] {
            let full = format!("{U}{p}");
            assert!(t.is_match(&full), "{full}");
        }
        for p in [
            "/app.slice/app-gnome-org.telegram.desktop2-1.scope",
            "/app.slice/app-gnome-xorg.telegram.desktop-1.scope",
            "/app.slice/app-gnome-org.telegram.desktop.scope",
            "/app.slice/org.telegram.desktop.service",
            "/app.slice/app-gnome-org.telegram.desktop-1.scopeX",
            "/app.slice/app-a-b-org.telegram.desktop-1.scope",
        ] {
            let full = format!("{U}{p}");
            assert!(!t.is_match(&full), "{full}");
        }
        // systemd's escaping of `-` (GNOME: `app-gnome-code\x2doss-77.scope`)
        let c = app("code-oss");
        assert!(c.is_match(&format!("{U}/app.slice/app-gnome-code\\x2doss-77.scope")));
        assert!(c.is_match(&format!("{U}/app.slice/app-code\\x2doss@77.service")));
        assert!(c.is_match(&format!("{U}/app.slice/app-flatpak-code-oss-77.scope")));
        assert!(!c.is_match(&format!("{U}/app.slice/app-gnome-code-oss-77.scope")));
        assert!(!app("gnome").is_match(&format!("{U}/app.slice/app-gnome-org.x-77.scope")));
        assert!(!app("oss").is_match(&format!("{U}/app.slice/app-gnome-code\\x2doss-77.scope")));
        // In any user's manager, or one user's
        assert!(t.is_match("/user.slice/user-1001.slice/user@1001.service/app.slice/app-gnome-org.telegram.desktop-9.scope"));
        let only = rx(Form::App {
            id: "org.telegram.desktop".into(),
            user: Some(1000),
        });
        assert!(only.is_match(&format!(
            "{U}/app.slice/app-gnome-org.telegram.desktop-9.scope"
        )));
        assert!(!only.is_match("/user.slice/user-1001.slice/user@1001.service/app.slice/app-gnome-org.telegram.desktop-9.scope"));
        assert!(!only.is_match("/system.slice/app-org.telegram.desktop.service"));
    }

    #[test]
    fn app_matches_snaps() {
        let f = app("firefox");
        for p in [
            "/user.slice/user-1000.slice/user@1000.service/app.slice/snap.firefox.firefox-8c2a3b94-3d3e-4c3f-9d8e-3b0f8a1c2d3e.scope",
            "/user.slice/user-1000.slice/user@1000.service/app.slice/snap.firefox.geckodriver-8c2a3b94-3d3e-4c3f-9d8e-3b0f8a1c2d3e.scope",
            "/system.slice/snap.firefox.daemon.service",
        ] {
            assert!(f.is_match(p), "{p}");
        }
        let one = app("snap.firefox.geckodriver");
        assert!(one.is_match("/app.slice/snap.firefox.geckodriver-8c2a3b94-3d3e.scope"));
        assert!(!one.is_match("/app.slice/snap.firefox.firefox-8c2a3b94-3d3e.scope"));
        assert!(app("firefox_geckodriver").is_match("/a/snap.firefox.geckodriver-1.scope"));
        assert!(!f.is_match("/a/snap.firefoxy.firefox-1.scope"));
    }

    #[test]
    fn app_ids_refused_with_a_hint() {
        for (id, hint) in [
            ("", "1 to 255"),
            ("foo.service", "\"unit\": \"foo.service\""),
            ("a b", "' '"),
            ("app-gnome-x\\x2dy-1", "'\\\\'"),
        ] {
            let e = Form::App {
                id: id.into(),
                user: None,
            }
            .compile()
            .unwrap_err();
            assert!(e.contains(hint), "{id:?}: {e}");
        }
    }

    #[test]
    fn unit_matches_its_cgroup_and_below() {
        let m = unit("mihomo.service");
        assert!(m.is_match("/system.slice/mihomo.service"));
        assert!(m.is_match("/system.slice/mihomo.service/sub/deeper"));
        assert!(m.is_match(&format!("{U}/app.slice/mihomo.service")));
        assert!(!m.is_match("/system.slice/xmihomo.service"));
        assert!(!m.is_match("/system.slice/mihomo.service2"));
        assert!(!m.is_match("/system.slice/mihomo.serviceX/a"));
        // templates
        let t = unit("openvpn-client@.service");
        assert!(
            t.is_match("/system.slice/system-openvpn\\x2dclient.slice/openvpn-client@work.service")
        );
        assert!(!t.is_match("/system.slice/openvpn-client@.service"));
        let i = unit("getty@tty1.service");
        assert!(i.is_match("/system.slice/system-getty.slice/getty@tty1.service"));
        assert!(!i.is_match("/system.slice/system-getty.slice/getty@tty2.service"));
        // escaped names as systemctl shows them; slices nest
        assert!(unit("foo\\x2dbar.service").is_match("/system.slice/foo\\x2dbar.service"));
        assert!(unit("cgtproxy-proxy.slice").is_match(&format!(
            "{U}/cgtproxy.slice/cgtproxy-proxy.slice/run-p1-i2.scope"
        )));
        // a user's unit, only in that user's manager
        let u = rx(Form::Unit {
            name: "pipewire.service".into(),
            user: Some(1000),
        });
        assert!(u.is_match(&format!("{U}/session.slice/pipewire.service")));
        assert!(!u.is_match("/system.slice/pipewire.service"));
    }

    #[test]
    fn unit_names_refused_with_a_hint() {
        for (n, hint) in [
            ("mihomo", "mihomo.service"),
            ("x.target", "no cgroup"),
            ("a b.service", "systemd-escape"),
            ("a@b@c.service", "more than one"),
            (".service", "empty"),
        ] {
            let e = Form::Unit {
                name: n.into(),
                user: None,
            }
            .compile()
            .unwrap_err();
            assert!(e.contains(hint), "{n:?}: {e}");
        }
    }

    #[test]
    fn container_ids() {
        let id = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
        let short = rx(Form::Container(id[..12].into()));
        let full = rx(Form::Container(id.to_uppercase()));
        for p in [
            format!("/system.slice/docker-{id}.scope"),
            format!("/machine.slice/libpod-{id}.scope/container"),
            format!("{U}/user.slice/libpod-{id}.scope"),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-{id}.scope"
            ),
            format!("/docker/{id}"),
        ] {
            assert!(short.is_match(&p), "{p}");
            assert!(full.is_match(&p), "{p}");
        }
        // conmon is not the container; other IDs do not match
        assert!(!short.is_match(&format!("/machine.slice/libpod-conmon-{id}.scope")));
        assert!(!short.is_match(&format!("/system.slice/docker-{}.scope", &id[1..])));
        assert!(Form::Container("abc".into()).compile().is_err());
        assert!(Form::Container("zz3c2b1a0e9d".into()).compile().is_err());
    }

    #[test]
    fn names_as_users_know_them() {
        let n = |c: &str, u| name_of(c, u).map(|n| n.label());
        assert_eq!(
            n("app-flatpak-org.telegram.desktop-12345.scope", Some(1000)).unwrap(),
            "app org.telegram.desktop (flatpak)"
        );
        assert_eq!(
            n("app-gnome-code\\x2doss-77.scope", None).unwrap(),
            "app code-oss (gnome)"
        );
        assert_eq!(
            n("app-org.kde.konsole@0a1b.service", None).unwrap(),
            "app org.kde.konsole"
        );
        assert_eq!(
            n("snap.firefox.firefox-8c2a3b94-3d3e.scope", None).unwrap(),
            "app snap.firefox.firefox (snap)"
        );
        assert_eq!(n("mihomo.service", None).unwrap(), "unit mihomo.service");
        let id = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
        assert_eq!(
            n(&format!("docker-{id}.scope"), None).unwrap(),
            "container 4f3c2b1a0e9d (docker)"
        );
        assert_eq!(n("child", None), None);
        assert_eq!(user_of(&format!("{U}/app.slice")), Some(1000));
        assert_eq!(user_of("/user.slice/user-1000.slice/session-2.scope"), None);
        // What `apps` tells a user to write selects the cgroup it named.
        for (c, path) in [
            (
                "app-gnome-code\\x2doss-77.scope",
                format!("{U}/app.slice/app-gnome-code\\x2doss-77.scope"),
            ),
            (
                "snap.firefox.firefox-8c2a.scope",
                format!("{U}/app.slice/snap.firefox.firefox-8c2a.scope"),
            ),
            ("mihomo.service", "/system.slice/mihomo.service".to_string()),
        ] {
            let named = name_of(c, user_of(&path)).unwrap();
            let form = match &named {
                Named::App { id, user, .. } => Form::App {
                    id: id.clone(),
                    user: *user,
                },
                Named::Unit { name, user } => Form::Unit {
                    name: name.clone(),
                    user: *user,
                },
                Named::Container { id, .. } => Form::Container(id.clone()),
            };
            assert!(rx(form).is_match(&path), "{c}");
        }
    }
}
