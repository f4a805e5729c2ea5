//! Config file: any text through `VmConfig::from_json` and `validate`, then the actions the
//! VMM derives from an accepted file; an accepted file also survives a round trip through
//! its own JSON form (what `GET /vm/config` answers).
#![no_main]

use api::models::VmConfig;
use api::requests::actions_from_config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = VmConfig::from_json(text) else {
        return;
    };
    let valid = config.validate().is_ok();
    let _ = config.validate_present();
    if valid {
        let _ = actions_from_config(&config);
        if let Some(boot) = &config.boot_source {
            let _ = boot.boot_args();
        }
    }
    let json = serde_json::to_string(&config).expect("a parsed config serialises");
    let again = VmConfig::from_json(&json).expect("a config's own JSON parses");
    assert_eq!(again, config);
});
