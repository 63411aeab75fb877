//! The Debian packages of both binaries, built with cargo-deb from the
//! `[package.metadata.deb]` sections of agent/ and receiver/Cargo.toml and the
//! files in packaging/.
//!
//! One test builds both packages from the binaries of the profile it runs in
//! (`cargo test --release` packages what `cargo deb -p NAME` ships; plain
//! `cargo test` reuses the debug build, saving CI a release build), then
//! checks with `dpkg-deb` what an operator gets: the binary, the systemd unit, the default
//! configuration registered as a conffile, the documentation and nothing else;
//! sane control fields (Depends on the C runtime only); maintainer scripts
//! that stop a service on removal and never enable or start one; debug symbols
//! in a separate `-dbgsym` package. The extracted binaries must run
//! (`--version`), and the units must pass `systemd-analyze verify` without a
//! single warning where systemd is installed.
//!
//! As root with dpkg, the packages are also installed, reinstalled over an
//! edited conffile, removed and purged in a throwaway root (`dpkg --root`),
//! their maintainer scripts running against it. Stand-ins for `systemctl` and
//! `deb-systemd-invoke` come first on PATH, so the scripts can never reach the
//! host's systemd; `deb-systemd-helper` honours `DPKG_ROOT`.
//!
//! Without cargo-deb the test fails naming the install command (CI installs
//! it), unless `LIFEBOAT_SKIP_PACKAGING=1` makes it skip.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lifeboat_tests::{binaries, skip, Outcome, Running};

const TEST: &str = "deb_packages";

/// Set to `1` to skip this test where cargo-deb is not installed (it fails
/// otherwise: CI installs it, and a silent skip would hide breakage).
const SKIP_ENV: &str = "LIFEBOAT_SKIP_PACKAGING";

/// How CI installs cargo-deb (`.ci/run`), and how a developer can.
const CARGO_DEB_INSTALL: &str = "cargo install cargo-deb@3.8.0 --locked";

/// One `cargo deb --no-build`: strip, split the symbols, compress.
const DEB_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// dpkg, dpkg-deb, systemd-analyze, `--version`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Packages the binaries may depend on: the C runtime. A new entry (a system
/// libssl, libzstd...) should be a decision, so it fails this test.
const ALLOWED_DEPENDS: [&str; 2] = ["libc6", "libgcc-s1"];

/// What one package must hold.
struct Expected {
    package: &'static str,
    exec_start: &'static str,
    capability_bounding_set: &'static str,
    state_directory: &'static str,
    conffile: &'static str,
    conffile_mode: &'static str,
}

const PACKAGES: [Expected; 2] = [
    Expected {
        package: "lifeboat-agent",
        exec_start: "/usr/bin/lifeboat-agent run --config /etc/lifeboat/agent.toml",
        capability_bounding_set: "CAP_SYS_ADMIN CAP_DAC_READ_SEARCH",
        state_directory: "lifeboat-agent",
        conffile: "/etc/lifeboat/agent.toml",
        conffile_mode: "-rw-r--r--",
    },
    Expected {
        package: "lifeboat-receiver",
        exec_start: "/usr/bin/lifeboat-receiver serve --dir /var/lib/lifeboat",
        capability_bounding_set: "",
        state_directory: "lifeboat",
        conffile: "/etc/default/lifeboat-receiver",
        conffile_mode: "-rw-------",
    },
];

impl Expected {
    fn unit(&self) -> String {
        format!("{}.service", self.package)
    }

    fn binary(&self) -> String {
        format!("/usr/bin/{}", self.package)
    }

    fn unit_path(&self) -> String {
        format!("/usr/lib/systemd/system/{}", self.unit())
    }

    /// Every file the package installs, with its mode.
    fn files(&self) -> BTreeMap<String, &'static str> {
        let doc = format!("/usr/share/doc/{}", self.package);
        BTreeMap::from([
            (self.binary(), "-rwxr-xr-x"),
            (self.unit_path(), "-rw-r--r--"),
            (self.conffile.to_string(), self.conffile_mode),
            (format!("{doc}/README.md"), "-rw-r--r--"),
            (format!("{doc}/copyright"), "-rw-r--r--"),
        ])
    }
}

#[test]
fn deb_packages() {
    let started = Instant::now();
    let Some(cargo_deb) = cargo_deb_or_skip() else {
        return;
    };
    if let Err(why) = find_program("dpkg-deb") {
        skip(TEST, &format!("{why}: not a Debian system"));
        return;
    }
    let workspace = workspace_root();
    let work = tempfile::tempdir().expect("create a temp dir");
    let out_dir = work.path().join("debs");
    std::fs::create_dir(&out_dir).expect("create the output directory");

    // The binaries of the profile the tests run in: `cargo test` packages the
    // debug build every end-to-end test shares (cargo-deb warns that it is
    // meant for releases), `cargo test --release` the release build, which is
    // what `cargo deb -p NAME` ships. Either way the packaging is the same:
    // the same metadata, assets, units and scripts.
    let t = Instant::now();
    let bins = binaries();
    let profile_dir = bins
        .agent
        .parent()
        .expect("binaries live in target/<profile>");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => panic!("odd profile directory {}", profile_dir.display()),
    };
    let target = profile_dir
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf();
    println!("{profile} binaries: {:.1}s", t.elapsed().as_secs_f64());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let arch = find_program("dpkg")
        .ok()
        .map(|dpkg| tool(&dpkg, ["--print-architecture"]).trim().to_string());
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let mut debs = Vec::new();
    for p in &PACKAGES {
        let t = Instant::now();
        let mut deb = Command::new(&cargo_deb);
        // --fast: lighter compression; the contents are the same.
        deb.args([
            "-p",
            p.package,
            "--no-build",
            "--fast",
            "--profile",
            profile,
        ])
        .arg("--output")
        .arg(&out_dir)
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .env("CARGO", &cargo)
        .env("CARGO_TARGET_DIR", &target);
        checked(deb, DEB_TIMEOUT);
        println!(
            "cargo deb -p {}: {:.1}s",
            p.package,
            t.elapsed().as_secs_f64()
        );
        let deb = find_output(&out_dir, &format!("{}_{version}_", p.package), ".deb");
        let dbgsym = find_output(
            &out_dir,
            &format!("{}-dbgsym_{version}_", p.package),
            ".ddeb",
        );
        check_contents(p, &deb);
        check_control(p, &deb, &version, arch.as_deref());
        check_maintainer_scripts(p, &deb);
        check_dbgsym(p, &dbgsym);
        let root = work.path().join(format!("extract-{}", p.package));
        tool(
            Path::new("dpkg-deb"),
            [OsStr::new("-x"), deb.as_os_str(), root.as_os_str()],
        );
        check_binary(p, &root);
        check_unit(p, &root, work.path());
        debs.push(deb);
    }
    let t = Instant::now();
    install_into_throwaway_root(&debs, work.path(), &version);
    println!(
        "install, upgrade, remove, purge: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    println!("{TEST}: {:.1}s in all", started.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// What the packages hold.

/// `dpkg-deb -c`: every regular file with its mode, owned by root, and nothing
/// but the expected files.
fn check_contents(p: &Expected, deb: &Path) {
    let listing = tool(Path::new("dpkg-deb"), [OsStr::new("-c"), deb.as_os_str()]);
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(mode), Some(owner), Some(path)) = (fields.first(), fields.get(1), fields.last())
        else {
            continue;
        };
        assert!(
            matches!(*owner, "root/root" | "0/0"),
            "{line}: not owned by root\n{listing}"
        );
        if mode.starts_with('d') {
            continue;
        }
        let path = path.strip_prefix('.').unwrap_or(path);
        files.insert(path.to_string(), *mode);
    }
    assert_eq!(
        files,
        p.files(),
        "{}: unexpected files or modes\n{listing}",
        deb.display()
    );
}

/// `dpkg-deb -f` and `-I conffiles`: names, version, architecture, Depends
/// limited to the C runtime, and the default configuration as the conffile.
fn check_control(p: &Expected, deb: &Path, version: &str, arch: Option<&str>) {
    let fields = control_fields(deb);
    let field = |name: &str| {
        fields
            .get(name)
            .unwrap_or_else(|| panic!("{}: no {name} field in {fields:?}", deb.display()))
            .as_str()
    };
    assert_eq!(field("Package"), p.package);
    assert_eq!(field("Version"), version);
    if let Some(arch) = arch {
        assert_eq!(field("Architecture"), arch);
    }
    assert!(!field("Maintainer").is_empty(), "{fields:?}");
    assert!(!field("Description").is_empty(), "{fields:?}");
    let depends = field("Depends");
    let names: BTreeSet<&str> = depends
        .split([',', '|'])
        .map(|d| d.split(['(', ' ']).find(|s| !s.is_empty()).unwrap_or(""))
        .collect();
    assert!(
        names.contains("libc6") && depends.contains("libc6 (>="),
        "Depends {depends:?} lacks a versioned libc6"
    );
    let unexpected: Vec<&&str> = names
        .iter()
        .filter(|n| !ALLOWED_DEPENDS.contains(n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "Depends {depends:?} names {unexpected:?}, beyond the C runtime {ALLOWED_DEPENDS:?}"
    );

    let conffiles = tool(
        Path::new("dpkg-deb"),
        [OsStr::new("-I"), deb.as_os_str(), OsStr::new("conffiles")],
    );
    assert_eq!(
        conffiles.lines().map(str::trim).collect::<Vec<_>>(),
        [p.conffile],
        "{}: conffiles",
        deb.display()
    );
}

/// The control fields of a package (continuation lines folded away).
fn control_fields(deb: &Path) -> BTreeMap<String, String> {
    let text = tool(Path::new("dpkg-deb"), [OsStr::new("-f"), deb.as_os_str()]);
    text.lines()
        .filter(|l| !l.starts_with([' ', '\t']))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// debhelper's systemd snippets as cargo-deb configures them: stop on
/// removal, restart on upgrade only if running, never enable or start.
fn check_maintainer_scripts(p: &Expected, deb: &Path) {
    let unit = p.unit();
    let script = |name: &str| {
        tool(
            Path::new("dpkg-deb"),
            [OsStr::new("-I"), deb.as_os_str(), OsStr::new(name)],
        )
    };
    let postinst = script("postinst");
    assert!(
        postinst.contains(&format!("deb-systemd-invoke try-restart {unit}")),
        "postinst does not restart a running {unit} on upgrade:\n{postinst}"
    );
    for forbidden in ["deb-systemd-invoke start", "_dh_action=start"] {
        assert!(
            !postinst.contains(forbidden),
            "postinst starts {unit} on install ({forbidden}):\n{postinst}"
        );
    }
    let prerm = script("prerm");
    assert!(
        prerm.contains(&format!("deb-systemd-invoke stop {unit}")),
        "prerm does not stop {unit}:\n{prerm}"
    );
    let postrm = script("postrm");
    assert!(
        postrm.contains(&format!("deb-systemd-helper purge {unit}")),
        "postrm does not forget {unit} on purge:\n{postrm}"
    );
}

/// The symbols live in the `-dbgsym` package, keyed by build id.
fn check_dbgsym(p: &Expected, ddeb: &Path) {
    let listing = tool(Path::new("dpkg-deb"), [OsStr::new("-c"), ddeb.as_os_str()]);
    assert!(
        listing
            .lines()
            .any(|l| l.contains("./usr/lib/debug/.build-id/") && l.ends_with(".debug")),
        "{}: no debug symbols for {}\n{listing}",
        ddeb.display(),
        p.package
    );
}

/// The extracted binary runs and is stripped.
fn check_binary(p: &Expected, root: &Path) {
    let bin = root.join(p.binary().trim_start_matches('/'));
    let out = tool(&bin, ["--version"]);
    assert_eq!(
        out.trim(),
        format!("{} {}", p.package, env!("CARGO_PKG_VERSION"))
    );
    if let Ok(readelf) = find_program("readelf") {
        let sections = tool(
            &readelf,
            [OsStr::new("-S"), OsStr::new("-W"), bin.as_os_str()],
        );
        assert!(
            !sections.contains(".debug_info"),
            "{} is not stripped",
            p.binary()
        );
    }
}

/// The unit's key settings, and `systemd-analyze verify` with no output at all
/// (it reports unknown keys and bad values as warnings, exiting 0).
fn check_unit(p: &Expected, root: &Path, work: &Path) {
    let unit_file = root.join(p.unit_path().trim_start_matches('/'));
    let text = std::fs::read_to_string(&unit_file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", unit_file.display()));
    let settings = unit_settings(&text);
    let expect = [
        ("ExecStart", p.exec_start),
        ("Restart", "on-failure"),
        ("CapabilityBoundingSet", p.capability_bounding_set),
        ("AmbientCapabilities", ""),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("StateDirectory", p.state_directory),
        ("WantedBy", "multi-user.target"),
    ];
    for (key, value) in expect {
        assert_eq!(
            settings.get(key).map(String::as_str),
            Some(value),
            "{}: {key}",
            p.unit()
        );
    }

    let Ok(analyze) = find_program("systemd-analyze") else {
        skip(
            &format!("{TEST} (systemd-analyze verify {})", p.unit()),
            "systemd-analyze is not installed",
        );
        return;
    };
    // verify checks that ExecStart's program exists: point it at the extracted
    // binary. The file keeps its name, which is the unit's.
    let dir = work.join(format!("verify-{}", p.package));
    std::fs::create_dir_all(&dir).expect("create the verify directory");
    let bin = root.join(p.binary().trim_start_matches('/'));
    let copy = dir.join(p.unit());
    std::fs::write(
        &copy,
        text.replace(&p.binary(), bin.to_str().expect("UTF-8 temp path")),
    )
    .expect("write the unit copy");
    let out = run(
        &analyze,
        [
            OsStr::new("verify"),
            OsStr::new("--man=no"),
            OsStr::new("--generators=no"),
            copy.as_os_str(),
        ],
        TOOL_TIMEOUT,
    );
    assert!(
        out.status.success() && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify {} ({}):\n{}{}",
        p.unit(),
        out.status,
        out.stdout,
        out.stderr
    );
}

/// The last value of each `Key=value` line (comments and sections ignored;
/// none of the checked keys is repeated).
fn unit_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// Installing into a throwaway root.

/// Install, reinstall over an edited conffile, remove and purge both packages
/// in a fresh dpkg root, with their maintainer scripts running.
fn install_into_throwaway_root(debs: &[PathBuf], work: &Path, version: &str) {
    let name = format!("{TEST} (dpkg --root install)");
    let dpkg = match find_program("dpkg") {
        Ok(d) => d,
        Err(why) => return skip(&name, &why),
    };
    if !is_root() {
        return skip(
            &name,
            "not root: dpkg could not give the installed files their owners",
        );
    }
    let root = work.join("root");
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d)).expect("create the dpkg database");
    }
    std::fs::write(admin.join("status"), "").expect("create the dpkg status file");

    // Stand-ins for what could reach the host's systemd. The scripts call
    // them only where /run/systemd/system exists (the host runs systemd);
    // they log, so the test can check nothing starts or enables a unit.
    let shims = work.join("shims");
    std::fs::create_dir_all(&shims).expect("create the shim directory");
    let shim_log = work.join("shims.log");
    for program in ["systemctl", "deb-systemd-invoke"] {
        let path = shims.join(program);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{program} $*\" >> '{}'\n",
                shim_log.display()
            ),
        )
        .expect("write a shim");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make a shim executable");
    }
    let path = std::env::join_paths(
        std::iter::once(shims.clone())
            .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from)),
    )
    .expect("join PATH");

    let dpkg_cmd = |args: &[&OsStr]| {
        let mut cmd = Command::new(&dpkg);
        cmd.arg(format!("--root={}", root.display()))
            .arg(format!("--log={}", work.join("dpkg.log").display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args)
            .env("PATH", &path)
            .env_remove("DPKG_ROOT");
        checked(cmd, TOOL_TIMEOUT)
    };
    let packages: Vec<&str> = PACKAGES.iter().map(|p| p.package).collect();
    let status = |package: &str| {
        tool(
            &dpkg_query(),
            [
                format!("--admindir={}", admin.display()),
                "--showformat=${db:Status-Abbrev}|${Version}|${Conffiles}".to_string(),
                "--show".to_string(),
                package.to_string(),
            ],
        )
    };
    let in_root = |p: &str| root.join(p.trim_start_matches('/'));

    let mut install: Vec<&OsStr> = vec![OsStr::new("--install")];
    install.extend(debs.iter().map(|d| d.as_os_str()));
    dpkg_cmd(&install);
    for p in &PACKAGES {
        let st = status(p.package);
        assert!(
            st.starts_with(&format!("ii |{version}|")) && st.contains(p.conffile),
            "{}: {st}",
            p.package
        );
        let out = tool(&in_root(&p.binary()), ["--version"]);
        assert!(out.starts_with(p.package), "{out}");
        assert!(
            in_root(&p.unit_path()).is_file(),
            "{} not installed",
            p.unit_path()
        );
        let wants = in_root("/etc/systemd/system/multi-user.target.wants").join(p.unit());
        assert!(
            wants.symlink_metadata().is_err(),
            "{} was enabled on install",
            p.unit()
        );
    }

    // A reinstall is an upgrade for the scripts; an edited conffile survives it.
    let edited = "# edited by the operator\n";
    for p in &PACKAGES {
        let path = in_root(p.conffile);
        let mut text = std::fs::read_to_string(&path).expect("read the conffile");
        text.push_str(edited);
        std::fs::write(&path, text).expect("edit the conffile");
    }
    dpkg_cmd(&install);
    for p in &PACKAGES {
        let text = std::fs::read_to_string(in_root(p.conffile)).expect("read the conffile");
        assert!(
            text.ends_with(edited),
            "{}: the operator's edit was lost on reinstall",
            p.conffile
        );
    }

    // Removal keeps the configuration; purge deletes it.
    let mut remove: Vec<&OsStr> = vec![OsStr::new("--remove")];
    remove.extend(packages.iter().map(OsStr::new));
    dpkg_cmd(&remove);
    for p in &PACKAGES {
        assert!(
            status(p.package).starts_with("rc "),
            "{}",
            status(p.package)
        );
        assert!(!in_root(&p.binary()).exists(), "{} left behind", p.binary());
        assert!(
            in_root(p.conffile).is_file(),
            "{} removed early",
            p.conffile
        );
    }
    let mut purge: Vec<&OsStr> = vec![OsStr::new("--purge")];
    purge.extend(packages.iter().map(OsStr::new));
    dpkg_cmd(&purge);
    for p in &PACKAGES {
        assert!(
            !in_root(p.conffile).exists(),
            "{} survived purge",
            p.conffile
        );
    }

    // Only reloads, stops and restarts of a running unit: nothing starts or
    // enables one. (Empty where the host does not run systemd.)
    let log = std::fs::read_to_string(&shim_log).unwrap_or_default();
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let allowed = match words.as_slice() {
            ["systemctl", "--system", "daemon-reload"] => true,
            ["deb-systemd-invoke", "try-restart" | "stop", units @ ..] => !units.is_empty(),
            _ => false,
        };
        assert!(
            allowed,
            "a maintainer script ran `{line}`; the packages never start or enable a unit"
        );
    }
}

// ---------------------------------------------------------------------------
// Tools.

/// The cargo-deb binary, or `None` after recording a skip when it is missing
/// and `LIFEBOAT_SKIP_PACKAGING=1`; panics naming the install command otherwise.
fn cargo_deb_or_skip() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    if let Some(found) = dirs
        .iter()
        .map(|d| d.join("cargo-deb"))
        .find(|p| p.is_file())
    {
        return Some(found);
    }
    let why = "cargo-deb is neither on PATH nor in ~/.cargo/bin";
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        skip(TEST, &format!("{why} ({SKIP_ENV}=1)"));
        return None;
    }
    panic!(
        "{why}: install it with `{CARGO_DEB_INSTALL}` (CI does), \
         or set {SKIP_ENV}=1 to skip the packaging test"
    );
}

/// `program` on PATH.
fn find_program(program: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{program} is not on PATH"))
}

fn dpkg_query() -> PathBuf {
    find_program("dpkg-query").unwrap_or_else(|e| panic!("{e} (dpkg is)"))
}

/// The effective user is root (the owner of /proc/self is the process's uid).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The one file in `dir` named `prefix*suffix`.
fn find_output(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list the output directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    assert!(
        found.len() == 1,
        "expected one {prefix}*{suffix} in {}, found {found:?}",
        dir.display()
    );
    found.into_iter().next().expect("one file")
}

fn run<I, S>(program: &Path, args: I, timeout: Duration) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    Running::spawn_command(cmd).wait(timeout)
}

/// Runs `program args`, panics unless it succeeds, returns its stdout.
fn tool<I, S>(program: &Path, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    checked(cmd, TOOL_TIMEOUT)
}

/// Runs a prepared command, panics unless it succeeds, returns its stdout.
fn checked(cmd: Command, timeout: Duration) -> String {
    let line = format!(
        "{:?} {:?}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>()
    );
    let out = Running::spawn_command(cmd).wait(timeout);
    assert!(
        out.status.success(),
        "{line} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}
