//! Real boots: `ember` starts our kernel with ember-init as PID 1, the guest reports what
//! it was given, and its power-off ends `ember` with status 0. Runs directly on hardware
//! KVM, else in the nested test bed; with neither, the tests fail and say why.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::time::Duration;

use testbed::{parse_ready_line, shell_quote, Artifacts, GuestSpec, Job};

fn artifacts() -> Artifacts {
    Artifacts::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// One booted guest's results, read back from the job directory.
struct Boot {
    stdout: String,
    stderr: String,
    status: i32,
}

/// Boots each guest once, one after the other, in a single test bed job.
fn boot_all(name: &str, guests: &[GuestSpec], bed_mem_mib: u32) -> Vec<Boot> {
    let art = artifacts();
    let mut script = String::new();
    for i in 0..guests.len() {
        script += &format!(
            "{} --no-api --config-file vm{i}.json --boot-timer > vm{i}.out 2> vm{i}.err < /dev/null; echo $? > vm{i}.rc\n",
            shell_quote(&art.ember)
        );
    }
    let job = Job::new(name, script)
        .memory_mib(bed_mem_mib)
        .timeout(Duration::from_secs(900));
    for (i, guest) in guests.iter().enumerate() {
        job.write_file(&format!("vm{i}.json"), &guest.config_json());
    }
    job.run().unwrap_or_else(|e| panic!("{e}")).assert_success();
    let read = |file: String| fs::read_to_string(job.dir().join(file)).unwrap_or_default();
    (0..guests.len())
        .map(|i| Boot {
            stdout: read(format!("vm{i}.out")),
            stderr: read(format!("vm{i}.err")),
            status: read(format!("vm{i}.rc")).trim().parse().unwrap_or(-1),
        })
        .collect()
}

#[test]
fn guests_get_the_cpus_and_memory_they_were_given() {
    let art = artifacts();
    let shapes = [(1u8, 128u32), (2, 512), (4, 2048)];
    let guests: Vec<GuestSpec> = shapes
        .iter()
        .map(|&(vcpus, mem_mib)| GuestSpec {
            vcpus,
            mem_mib,
            ..GuestSpec::standard(&art)
        })
        .collect();
    let boots = boot_all("shapes", &guests, 3584);
    for ((vcpus, mem_mib), boot) in shapes.iter().zip(&boots) {
        let context = format!(
            "{vcpus} vCPUs, {mem_mib} MiB\n{}\n{}",
            boot.stdout, boot.stderr
        );
        assert_eq!(
            boot.status, 0,
            "guest power-off must end ember with 0: {context}"
        );
        let ready =
            parse_ready_line(&boot.stdout).unwrap_or_else(|| panic!("no ready line: {context}"));
        assert_eq!(ready.cpus, u32::from(*vcpus), "{context}");
        // The e820 map hands over all RAM but the 384 KiB between the EBDA and 1 MiB.
        let given_kib = u64::from(*mem_mib) * 1024;
        assert!(
            ready.ram_kib <= given_kib && ready.ram_kib >= given_kib - 1024,
            "guest sees {} KiB of RAM for {given_kib} KiB given: {context}",
            ready.ram_kib
        );
        assert_eq!(ready.hostname, "ember");
    }
}

#[test]
fn kernel_command_line_reaches_the_guest() {
    let art = artifacts();
    let tag = format!("probe{}", std::process::id());
    let guest = GuestSpec {
        boot_args: format!(
            "{} ember.hostname={tag} probe.token={tag}",
            testbed::TEST_BOOT_ARGS
        ),
        ..GuestSpec::standard(&art)
    };
    let boot = &boot_all("cmdline", &[guest], 1024)[0];
    assert_eq!(boot.status, 0, "{}\n{}", boot.stdout, boot.stderr);
    let cmdline = boot
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ember-init: cmdline: "))
        .unwrap_or_else(|| panic!("no cmdline line:\n{}", boot.stdout));
    assert!(cmdline.contains(&format!("probe.token={tag}")), "{cmdline}");
    assert_eq!(
        parse_ready_line(&boot.stdout).map(|r| r.hostname),
        Some(tag)
    );
}

#[test]
fn bzimage_boots_like_vmlinux() {
    let art = artifacts();
    let guest = GuestSpec {
        kernel: art.bzimage.clone(),
        vcpus: 2,
        ..GuestSpec::standard(&art)
    };
    let boot = &boot_all("bzimage", &[guest], 1024)[0];
    assert_eq!(boot.status, 0, "{}\n{}", boot.stdout, boot.stderr);
    let ready = parse_ready_line(&boot.stdout).unwrap_or_else(|| panic!("{}", boot.stdout));
    assert_eq!(ready.cpus, 2);
}

#[test]
fn boot_timer_reports_the_guest_boot_time() {
    let boot = &boot_all("boot-timer", &[GuestSpec::standard(&artifacts())], 1024)[0];
    assert_eq!(boot.status, 0, "{}\n{}", boot.stdout, boot.stderr);
    let line = boot
        .stderr
        .lines()
        .find(|l| l.starts_with("ember: guest boot time: "))
        .unwrap_or_else(|| panic!("no boot time on stderr:\n{}", boot.stderr));
    let micros: u64 = line["ember: guest boot time: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable boot time line {line:?}"));
    assert!(micros > 0, "{line}");
    // ember's own messages go to stderr; the guest console alone goes to stdout.
    assert!(!boot.stdout.contains("ember: guest boot time"));
}
