//! Every statement the store runs, rendered once per store for its schema.
//!
//! The schema name is bracket-quoted into the text (`[name].onboard_devices`) when the store is
//! built, so a query costs nothing extra for it: each method borrows a ready `String`. Values
//! are always parameters (`@P1`, `@P2`, ...); the only text spliced in is the validated
//! [`SchemaName`].

use super::batch::NOT_FOUND;
use super::rows::{
    CONFIG_COLUMNS, CREDENTIAL_COLUMNS, DEVICE_COLUMNS, EVENT_COLUMNS, FIRMWARE_COLUMNS,
};
use super::schema::SchemaName;

/// Declares [`Statements`] with one `String` field per statement, and [`Statements::all`].
macro_rules! statements {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// The statements of one store, for one schema.
        pub struct Statements {
            /// The bracket-quoted schema, for statements built per call.
            schema: String,
            $($(#[$doc])* pub $name: String,)*
        }

        impl Statements {
            /// Every fixed statement, with its name (for checks over all of them).
            #[cfg(test)]
            pub fn all(&self) -> Vec<(&'static str, &str)> {
                vec![$((stringify!($name), self.$name.as_str()),)*]
            }
        }
    };
}

statements! {
    insert_event,
    insert_pending_device,
    update_pending_device,
    update_device_for_enrollment,
    insert_device_for_enrollment,
    insert_credential,
    revoke_device_credentials,
    /// `revoke_device_credentials` without reading the serials back (inside a batch).
    revoke_device_credentials_quietly,
    /// Raise `batch::NOT_FOUND` unless the device exists.
    require_device,
    /// Read a device's state into the batch variable `@previous_state`.
    read_device_state,
    /// Copy a device's unrevoked serials into the batch table variable `@revoked`.
    unrevoked_serials_into,
    /// Insert configuration version latest + 1 (1 for the first) and return the new row.
    insert_next_config,
    /// Guarded state change: from one of five state slots.
    transition_device,
    insert_firmware_job,
    /// Forward-only job progress: from one of four status slots.
    advance_firmware_job,
    /// A change-feed row.
    insert_change,
    /// A change-feed row for the device owning a credential.
    insert_credential_change,
    latest_change,
    changes_since,
    prune_changes,
    insert_enrollment,
    activate_device,
    activate_credential,
    activate_supersede,
    expire_device,
    expire_credential,
    import_lookup,
    device,
    count_by_state,
    set_firmware_version,
    find_enrollment,
    pending_activations,
    credential,
    credentials_of,
    mark_credential_used,
    revoke_credential,
    revoked_serials,
    latest_config,
    config_version,
    config_history,
    published_configs,
    ack_config_applied,
    ack_config_failed,
    firmware_job,
    latest_firmware_job,
    events,
    /// At most @P2 audit rows older than @P1, oldest first (one batch of retention).
    delete_events_before,
    insert_admin_reply,
    admin_reply,
    /// `find_enrollment` then `device` (@P1 device id, @P2 request id): two result sets.
    enrollment_context,
    /// `credential` then `device` (@P1 serial, @P2 device id): two result sets.
    credential_and_device,
}

impl Statements {
    /// Render every statement for `schema`.
    pub fn new(schema: &SchemaName) -> Statements {
        let s = schema.quoted();
        Statements {
            insert_event: format!(
                "INSERT INTO {s}.onboard_events \
                 (device_id, occurred_at, event_name, detail, actor, request_id) \
                 VALUES (@P1, @P2, @P3, @P4, @P5, CAST(@P6 AS nvarchar(128)))"
            ),
            insert_pending_device: format!(
                "INSERT INTO {s}.onboard_devices \
                 (id, device_type, model, location, firmware_version, state, generation, \
                 created_at, updated_at) \
                 VALUES (@P1, @P2, CAST(@P3 AS nvarchar(400)), CAST(@P4 AS nvarchar(400)), \
                 CAST(@P5 AS nvarchar(128)), N'pending', 0, @P6, @P6)"
            ),
            update_pending_device: format!(
                "UPDATE d SET d.device_type = @P2, \
                 d.model = CAST(@P3 AS nvarchar(400)), d.location = CAST(@P4 AS nvarchar(400)), \
                 d.firmware_version = CAST(@P5 AS nvarchar(128)), d.updated_at = @P6 \
                 FROM {s}.onboard_devices AS d WHERE d.id = @P1 AND d.state = N'pending'"
            ),
            update_device_for_enrollment: format!(
                "UPDATE d SET d.device_type = @P2, \
                 d.model = COALESCE(CAST(@P3 AS nvarchar(400)), d.model), \
                 d.location = COALESCE(CAST(@P4 AS nvarchar(400)), d.location), \
                 d.firmware_version = COALESCE(CAST(@P5 AS nvarchar(128)), d.firmware_version), \
                 d.state = N'enrolling', d.credential_kind = @P6, d.current_serial = @P7, \
                 d.generation = d.generation + 1, d.updated_at = @P8, d.enrolled_at = @P8, \
                 d.activated_at = NULL, d.activation_deadline = @P9, d.last_error = NULL, \
                 d.factory_serial = CASE WHEN d.factory_issuer IS NULL \
                 THEN CAST(@P12 AS nvarchar(128)) ELSE d.factory_serial END, \
                 d.factory_issuer = COALESCE(d.factory_issuer, CAST(@P11 AS nvarchar(400))) \
                 FROM {s}.onboard_devices AS d \
                 WHERE d.id = @P1 AND d.generation = @P10 AND d.state <> N'revoked' \
                 AND (d.factory_issuer IS NULL \
                 OR d.factory_issuer = CAST(@P11 AS nvarchar(400)))"
            ),
            insert_device_for_enrollment: format!(
                "INSERT INTO {s}.onboard_devices \
                 (id, device_type, model, location, firmware_version, state, credential_kind, \
                 current_serial, generation, created_at, updated_at, enrolled_at, \
                 activation_deadline, factory_issuer, factory_serial) \
                 VALUES (@P1, @P2, CAST(@P3 AS nvarchar(400)), CAST(@P4 AS nvarchar(400)), \
                 CAST(@P5 AS nvarchar(128)), N'enrolling', @P6, @P7, 1, @P8, @P8, @P8, @P9, \
                 CAST(@P10 AS nvarchar(400)), CAST(@P11 AS nvarchar(128)))"
            ),
            insert_credential: format!(
                "INSERT INTO {s}.onboard_credentials \
                 (serial, fingerprint, device_id, kind, password_hash, not_after, created_at, \
                 activated_at, revoked_at, revoke_reason) \
                 VALUES (@P1, @P2, @P3, @P4, CAST(@P5 AS nvarchar(400)), \
                 CAST(@P6 AS datetime2), @P7, CAST(@P8 AS datetime2), CAST(@P9 AS datetime2), \
                 CAST(@P10 AS nvarchar(400)))"
            ),
            revoke_device_credentials: format!(
                "UPDATE c SET c.revoked_at = @P2, c.revoke_reason = @P3 \
                 OUTPUT INSERTED.serial \
                 FROM {s}.onboard_credentials AS c \
                 WHERE c.device_id = @P1 AND c.revoked_at IS NULL"
            ),
            revoke_device_credentials_quietly: format!(
                "UPDATE c SET c.revoked_at = @P2, c.revoke_reason = @P3 \
                 FROM {s}.onboard_credentials AS c \
                 WHERE c.device_id = @P1 AND c.revoked_at IS NULL"
            ),
            require_device: format!(
                "IF NOT EXISTS (SELECT 1 FROM {s}.onboard_devices AS d WHERE d.id = @P1) \
                 THROW {NOT_FOUND}, N'no such device', 1"
            ),
            read_device_state: format!(
                "SELECT @previous_state = d.state FROM {s}.onboard_devices AS d WHERE d.id = @P1"
            ),
            unrevoked_serials_into: format!(
                "INSERT INTO @revoked (serial) SELECT c.serial \
                 FROM {s}.onboard_credentials AS c \
                 WHERE c.device_id = @P1 AND c.revoked_at IS NULL"
            ),
            insert_next_config: format!(
                "INSERT INTO {s}.onboard_device_configs \
                 (device_id, version, body, created_by, created_at) \
                 OUTPUT INSERTED.device_id, INSERTED.version, INSERTED.body, \
                 INSERTED.created_by, INSERTED.created_at, INSERTED.applied_at, \
                 INSERTED.failed_error \
                 SELECT @P1, COALESCE(MAX(c.version), 0) + 1, @P2, @P3, @P4 \
                 FROM {s}.onboard_device_configs AS c WHERE c.device_id = @P1"
            ),
            transition_device: format!(
                "UPDATE d SET d.state = @P2, \
                 d.last_error = CAST(@P3 AS nvarchar(max)), d.updated_at = @P4, \
                 d.factory_issuer = CASE WHEN @P5 = 1 THEN NULL ELSE d.factory_issuer END, \
                 d.factory_serial = CASE WHEN @P5 = 1 THEN NULL ELSE d.factory_serial END \
                 FROM {s}.onboard_devices AS d \
                 WHERE d.id = @P1 AND d.state IN (@P6, @P7, @P8, @P9, @P10)"
            ),
            insert_firmware_job: format!(
                "INSERT INTO {s}.onboard_firmware_jobs \
                 (job_id, device_id, version, url, sha256, size, status, error, created_by, \
                 created_at, updated_at) \
                 VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, CAST(@P8 AS nvarchar(max)), @P9, \
                 @P10, @P11)"
            ),
            advance_firmware_job: format!(
                "UPDATE f SET f.status = @P3, \
                 f.error = CAST(@P4 AS nvarchar(max)), f.updated_at = @P5 \
                 FROM {s}.onboard_firmware_jobs AS f WHERE f.job_id = @P1 AND f.device_id = @P2 \
                 AND f.status IN (@P6, @P7, @P8, @P9)"
            ),
            insert_change: format!(
                "INSERT INTO {s}.onboard_changes (device_id, kind, origin, occurred_at) \
                 VALUES (@P1, @P2, @P3, @P4)"
            ),
            insert_credential_change: format!(
                "INSERT INTO {s}.onboard_changes (device_id, kind, origin, occurred_at) \
                 SELECT c.device_id, N'credentials', @P2, @P3 \
                 FROM {s}.onboard_credentials AS c WHERE c.serial = @P1"
            ),
            latest_change: format!(
                "SELECT COALESCE(MAX(ch.id), 0) AS id FROM {s}.onboard_changes AS ch"
            ),
            changes_since: format!(
                "SELECT TOP (@P2) ch.id, ch.device_id, ch.kind, ch.origin, ch.occurred_at \
                 FROM {s}.onboard_changes AS ch WHERE ch.id > @P1 ORDER BY ch.id"
            ),
            prune_changes: format!("DELETE FROM {s}.onboard_changes WHERE occurred_at < @P1"),
            insert_enrollment: format!(
                "INSERT INTO {s}.onboard_enrollments \
                 (device_id, request_id, serial, response, created_at) \
                 VALUES (@P1, @P2, @P3, @P4, @P5)"
            ),
            activate_device: format!(
                "UPDATE d SET d.state = N'active', d.activated_at = @P3, d.updated_at = @P3 \
                 FROM {s}.onboard_devices AS d \
                 WHERE d.id = @P1 AND d.state = N'enrolling' AND d.current_serial = @P2"
            ),
            activate_credential: format!(
                "UPDATE c SET c.activated_at = COALESCE(c.activated_at, @P2) \
                 FROM {s}.onboard_credentials AS c WHERE c.serial = @P1"
            ),
            activate_supersede: format!(
                "UPDATE c SET c.revoked_at = @P3, c.revoke_reason = N'superseded' \
                 FROM {s}.onboard_credentials AS c \
                 WHERE c.device_id = @P1 AND c.serial <> @P2 AND c.revoked_at IS NULL"
            ),
            expire_device: format!(
                "UPDATE d SET d.state = N'failed', d.last_error = N'activation_timeout', \
                 d.updated_at = @P3 \
                 FROM {s}.onboard_devices AS d \
                 WHERE d.id = @P1 AND d.state = N'enrolling' AND d.current_serial = @P2"
            ),
            expire_credential: format!(
                "UPDATE c SET c.revoked_at = @P2, c.revoke_reason = N'activation_timeout' \
                 FROM {s}.onboard_credentials AS c WHERE c.serial = @P1 AND c.revoked_at IS NULL"
            ),
            import_lookup: format!(
                "SELECT d.device_type, d.model, d.location, d.firmware_version, d.state \
                 FROM {s}.onboard_devices AS d WHERE d.id = @P1"
            ),
            device: format!(
                "SELECT {DEVICE_COLUMNS} FROM {s}.onboard_devices AS d WHERE d.id = @P1"
            ),
            count_by_state: format!(
                "SELECT d.state, COUNT_BIG(*) AS n FROM {s}.onboard_devices AS d \
                 GROUP BY d.state"
            ),
            set_firmware_version: format!(
                "UPDATE d SET d.firmware_version = @P2, d.updated_at = @P3 \
                 FROM {s}.onboard_devices AS d WHERE d.id = @P1"
            ),
            find_enrollment: format!(
                "SELECT e.device_id, e.request_id, e.serial, e.response, e.created_at \
                 FROM {s}.onboard_enrollments AS e \
                 WHERE e.device_id = @P1 AND e.request_id = @P2"
            ),
            pending_activations: format!(
                "SELECT d.id, d.current_serial, d.activation_deadline \
                 FROM {s}.onboard_devices AS d WHERE d.state = N'enrolling' \
                 ORDER BY d.activation_deadline, d.id"
            ),
            credential: format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM {s}.onboard_credentials AS c \
                 WHERE c.serial = @P1"
            ),
            credentials_of: format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM {s}.onboard_credentials AS c \
                 WHERE c.device_id = @P1 ORDER BY c.created_at, c.serial"
            ),
            mark_credential_used: format!(
                "UPDATE c SET c.activated_at = @P2 FROM {s}.onboard_credentials AS c \
                 WHERE c.serial = @P1 AND c.activated_at IS NULL"
            ),
            revoke_credential: format!(
                "UPDATE c SET c.revoked_at = @P2, c.revoke_reason = @P3 \
                 FROM {s}.onboard_credentials AS c \
                 WHERE c.serial = @P1 AND c.revoked_at IS NULL"
            ),
            revoked_serials: format!(
                "SELECT c.serial FROM {s}.onboard_credentials AS c \
                 WHERE c.revoked_at IS NOT NULL ORDER BY c.serial"
            ),
            latest_config: format!(
                "SELECT TOP (1) {CONFIG_COLUMNS} FROM {s}.onboard_device_configs AS c \
                 WHERE c.device_id = @P1 ORDER BY c.version DESC"
            ),
            config_version: format!(
                "SELECT {CONFIG_COLUMNS} FROM {s}.onboard_device_configs AS c \
                 WHERE c.device_id = @P1 AND c.version = @P2"
            ),
            config_history: format!(
                "SELECT {CONFIG_COLUMNS} FROM {s}.onboard_device_configs AS c \
                 WHERE c.device_id = @P1 ORDER BY c.version"
            ),
            published_configs: format!(
                "SELECT TOP (@P2) {CONFIG_COLUMNS} FROM {s}.onboard_device_configs AS c \
                 INNER JOIN {s}.onboard_devices AS d ON d.id = c.device_id \
                 WHERE d.state IN (N'enrolling', N'active') AND c.device_id > @P1 \
                 AND c.version = (SELECT MAX(c2.version) FROM {s}.onboard_device_configs AS c2 \
                                  WHERE c2.device_id = c.device_id) \
                 ORDER BY c.device_id"
            ),
            ack_config_applied: format!(
                "UPDATE c SET c.applied_at = @P3, c.failed_error = NULL \
                 FROM {s}.onboard_device_configs AS c \
                 WHERE c.device_id = @P1 AND c.version = @P2"
            ),
            ack_config_failed: format!(
                "UPDATE c SET c.failed_error = @P3 \
                 FROM {s}.onboard_device_configs AS c \
                 WHERE c.device_id = @P1 AND c.version = @P2"
            ),
            firmware_job: format!(
                "SELECT {FIRMWARE_COLUMNS} FROM {s}.onboard_firmware_jobs AS f \
                 WHERE f.job_id = @P1 AND f.device_id = @P2"
            ),
            latest_firmware_job: format!(
                "SELECT TOP (1) {FIRMWARE_COLUMNS} FROM {s}.onboard_firmware_jobs AS f \
                 WHERE f.device_id = @P1 ORDER BY f.seq DESC"
            ),
            events: format!(
                "SELECT {EVENT_COLUMNS} FROM (\
                   SELECT TOP (@P2) x.id, x.device_id, x.occurred_at, x.event_name, x.detail, \
                     x.actor, x.request_id \
                   FROM {s}.onboard_events AS x WHERE x.device_id = @P1 \
                   ORDER BY x.occurred_at DESC, x.id DESC) AS e \
                 ORDER BY e.occurred_at, e.id"
            ),
            delete_events_before: format!(
                "DELETE x FROM {s}.onboard_events AS x WHERE x.id IN (\
                   SELECT TOP (@P2) o.id FROM {s}.onboard_events AS o \
                   WHERE o.occurred_at < @P1 ORDER BY o.id)"
            ),
            insert_admin_reply: format!(
                "INSERT INTO {s}.onboard_admin_replies (request_id, reply, created_at) \
                 VALUES (@P1, @P2, @P3)"
            ),
            admin_reply: format!(
                "SELECT a.reply FROM {s}.onboard_admin_replies AS a WHERE a.request_id = @P1"
            ),
            enrollment_context: String::new(),
            credential_and_device: String::new(),
            schema: s,
        }
        .with_combined_reads()
    }

    /// The reads that go together in one request, from the single ones: a device connecting or
    /// enrolling waits for each of them.
    fn with_combined_reads(mut self) -> Statements {
        self.enrollment_context = format!("{};\n{};", self.find_enrollment, self.device);
        self.credential_and_device = format!(
            "{};\n{};",
            self.credential,
            self.device.replace("@P1", "@P2")
        );
        self
    }

    /// `SELECT` of the devices list, with the optional filters present as fixed fragments and
    /// numbered placeholders in the order: state, device type, expiring-before, offset, limit.
    pub fn device_list(
        &self,
        state: bool,
        device_type: bool,
        expiring: bool,
        paged: bool,
        limit: bool,
    ) -> String {
        let s = &self.schema;
        let mut sql = format!("SELECT {DEVICE_COLUMNS} FROM {s}.onboard_devices AS d WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if state {
            sql.push_str(&format!(" AND d.state = @P{}", next()));
        }
        if device_type {
            sql.push_str(&format!(" AND d.device_type = @P{}", next()));
        }
        if expiring {
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM {s}.onboard_credentials AS c \
                 WHERE c.serial = d.current_serial AND c.not_after < @P{})",
                next()
            ));
        }
        sql.push_str(" ORDER BY d.id");
        if paged || limit {
            sql.push_str(&format!(" OFFSET @P{} ROWS", next()));
            if limit {
                sql.push_str(&format!(" FETCH NEXT @P{} ROWS ONLY", next()));
            }
        }
        sql
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn for_schema(name: &str) -> Statements {
        Statements::new(&SchemaName::parse(name).expect("valid schema"))
    }

    /// Every statement, the dynamic list in all its shapes included.
    fn every_statement(sql: &Statements) -> Vec<String> {
        let mut all: Vec<String> = sql.all().into_iter().map(|(_, s)| s.to_owned()).collect();
        for shape in 0..32u8 {
            let bit = |n: u8| shape & (1 << n) != 0;
            all.push(sql.device_list(bit(0), bit(1), bit(2), bit(3), bit(4)));
        }
        all
    }

    #[test]
    fn statements_use_the_configured_schema() {
        let sql = for_schema("myschema");
        assert!(
            sql.device.contains("FROM [myschema].onboard_devices AS d"),
            "{}",
            sql.device
        );
        for text in every_statement(&sql) {
            assert!(text.contains("[myschema].onboard_"), "{text}");
            assert!(!text.to_ascii_lowercase().contains("dbo."), "{text}");
            // Every table reference is qualified by the schema.
            let bare = text.matches("onboard_").count();
            let qualified = text.matches("[myschema].onboard_").count();
            assert_eq!(bare, qualified, "unqualified table in {text}");
        }
        let list = sql.device_list(false, false, true, false, false);
        assert!(
            list.contains("FROM [myschema].onboard_credentials AS c"),
            "{list}"
        );
    }

    #[test]
    fn default_schema_is_dbo() {
        let sql = Statements::new(&SchemaName::default());
        for text in every_statement(&sql) {
            assert!(text.contains("[dbo].onboard_"), "{text}");
        }
        assert_eq!(
            sql.admin_reply,
            "SELECT a.reply FROM [dbo].onboard_admin_replies AS a WHERE a.request_id = @P1"
        );
    }

    #[test]
    fn device_list_numbers_placeholders_in_order() {
        let sql = for_schema("dbo");
        let list = sql.device_list(false, false, false, false, false);
        assert!(list.ends_with("WHERE 1 = 1 ORDER BY d.id"), "{list}");
        assert!(!list.contains("@P"));

        let list = sql.device_list(true, true, true, true, true);
        for (n, fragment) in [
            (1, "d.state = @P1"),
            (2, "d.device_type = @P2"),
            (3, "c.not_after < @P3"),
            (4, "OFFSET @P4 ROWS"),
            (5, "FETCH NEXT @P5 ROWS ONLY"),
        ] {
            assert!(list.contains(fragment), "{n}: {list}");
        }

        let list = sql.device_list(false, true, false, false, true);
        assert!(list.contains("d.device_type = @P1"), "{list}");
        assert!(
            list.contains("OFFSET @P2 ROWS FETCH NEXT @P3 ROWS ONLY"),
            "{list}"
        );

        let list = sql.device_list(false, false, false, true, false);
        assert!(list.ends_with("ORDER BY d.id OFFSET @P1 ROWS"), "{list}");
    }

    #[test]
    fn statements_are_portable_and_qualified() {
        let sql = for_schema("dbo");
        for text in every_statement(&sql) {
            let upper = text.to_ascii_uppercase();
            for banned in [
                "MERGE",
                "UPDLOCK",
                "HOLDLOCK",
                "ROWLOCK",
                "READPAST",
                "CREATE OR ALTER",
            ] {
                assert!(!upper.contains(banned), "{banned}: {text}");
            }
            if upper.starts_with("UPDATE ") {
                // `UPDATE alias SET alias.col = ... FROM [schema].table AS alias`
                assert!(upper.contains(" FROM [DBO]."), "{text}");
                let set = &upper[upper.find(" SET ").unwrap_or(0)..];
                let set = &set[..set.find(" FROM ").unwrap_or(set.len())];
                let set = &set[..set.find(" OUTPUT ").unwrap_or(set.len())];
                // (pieces without ` = ` are arguments of a function call)
                for assignment in set
                    .trim_start_matches(" SET ")
                    .split(", ")
                    .filter(|piece| piece.contains(" = "))
                {
                    assert!(
                        assignment.trim().chars().nth(1) == Some('.'),
                        "unqualified: {assignment}"
                    );
                }
            }
        }
        assert!(sql.insert_next_config.contains("OUTPUT INSERTED.device_id"));
    }

    #[test]
    fn placeholders_are_numbered_contiguously() {
        let sql = for_schema("dbo");
        for (name, text) in sql.all() {
            let highest = (1..=20)
                .filter(|n| text.contains(&format!("@P{n}")))
                .max()
                .unwrap_or(0);
            for n in 1..=highest {
                assert!(text.contains(&format!("@P{n}")), "{name}: @P{n} missing");
            }
        }
        for (text, count) in [
            (&sql.insert_event, 6),
            (&sql.insert_pending_device, 6),
            (&sql.update_pending_device, 6),
            (&sql.update_device_for_enrollment, 12),
            (&sql.insert_device_for_enrollment, 11),
            (&sql.insert_credential, 10),
            (&sql.revoke_device_credentials, 3),
            (&sql.insert_next_config, 4),
            (&sql.insert_enrollment, 5),
            (&sql.transition_device, 10),
            (&sql.insert_firmware_job, 11),
            (&sql.advance_firmware_job, 9),
            (&sql.insert_change, 4),
            (&sql.insert_credential_change, 3),
        ] {
            for n in 1..=count {
                assert!(text.contains(&format!("@P{n}")), "@P{n} missing in {text}");
            }
            assert!(
                !text.contains(&format!("@P{}", count + 1)),
                "extra placeholder in {text}"
            );
        }
    }
}
