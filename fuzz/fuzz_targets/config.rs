//! The configuration file (TOML): a refused file names what is wrong (a bad
//! value names its dotted field); an accepted one, written back as TOML,
//! reads to the same configuration.
#![no_main]

use cartscore_appliance::config::{ApplianceConfig, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ApplianceConfig::from_toml_str(text) {
        Ok(config) => {
            let written = toml::to_string(&config).expect("a config writes as TOML");
            let again = ApplianceConfig::from_toml_str(&written)
                .unwrap_or_else(|e| panic!("{written}\nno longer reads: {e}"));
            assert_eq!(again, config, "{written}");
        }
        Err(error) => {
            assert!(!error.to_string().is_empty());
            if let ConfigError::Invalid { field, .. } = &error {
                assert!(!field.is_empty(), "{error}");
            }
        }
    }
});
